//! Sending a request upstream: the backend's endpoints and limits, one
//! attempt after another under the route's timeouts and retry policy and
//! the backend's retry budget, and the request as it goes on the wire.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use mesh_core::hbone::ConnectHeaders;
use mesh_core::state::Workload;

use super::record::Recorder;
use super::{Downstream, Resolved, Waypoint};
use crate::lb::{BackendStats, Held};
use crate::reqbody::{BodyError, RequestBody, RetryBuffer};
use crate::routes::{Backend, BackendPolicy, Route};
use crate::telemetry::Flag;
use crate::upstream::{Dial, Lease, Limits as ConnLimits, Proto, UpstreamError};

impl Waypoint {
    /// Sends to the backend with timeouts and retries; the upstream response
    /// or what to answer instead.
    pub(super) async fn forward(
        &self,
        ds: &Downstream,
        route: &Route,
        backend: &Backend,
        out: Outgoing,
        rec: &mut Recorder,
    ) -> Result<Forwarded, Failure> {
        let (up, admitted) = self.upstream(ds, backend, rec)?;
        let mut at = Attempts {
            // The route's timeout, or a gRPC client's own deadline when
            // that comes sooner.
            deadline: match (
                route.request_timeout.map(|t| rec.started + t),
                super::grpc::deadline(&out.headers, rec.started),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            max: route.retry.as_ref().map(|r| r.attempts).unwrap_or(0) + 1,
            made: 0,
            tried: Vec::new(),
            retry_slot: None,
        };
        loop {
            at.made += 1;
            let endpoints = &up.dest.endpoints;
            let Some((ep, ep_stats)) = self
                .balancer
                .pick(&up.stats, endpoints, &at.tried, &up.policy)
            else {
                return Err(NO_HEALTHY);
            };
            at.tried.push(ep.uid.clone());
            let Some(ip) = ep.addresses.first().copied() else {
                return Err(NO_HEALTHY);
            };
            let target = SocketAddr::new(ip, up.dest.port_on(&ep, up.port));
            rec.set_destination_workload(&ep, target);
            let now = Instant::now();
            let remaining = at.deadline.map(|d| d.saturating_duration_since(now));
            let per_try = match (route.per_try_timeout, remaining) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Held while the attempt runs, released even if the client goes
            // away and this future is dropped.
            let in_flight = crate::lb::InFlight::new(ep_stats.clone());
            let headers = ConnectHeaders {
                forwarded_for: Some(ds.peer),
                // The backend service ("namespace/hostname"), so the
                // destination attributes the request to it.
                forwarded_host: backend
                    .service
                    .split_once('/')
                    .map(|(_, host)| host.to_string()),
                traceparent: Some(rec.trace.traceparent()),
                baggage: None,
            };
            let send = self.send_once(&backend.service, &up.limits, &ep, target, &headers, &out);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, send).await.ok(),
                None => Some(send.await),
            };
            drop(in_flight);
            // What this attempt came to, and whether another may follow.
            let (failure, retriable) = match result {
                Some(Ok((lease, resp))) => {
                    let status = resp.status();
                    let failed = status.is_server_error();
                    self.balancer
                        .observe(&ep_stats, failed, up.policy.outlier.as_ref(), endpoints);
                    // Only a body still whole in the retry buffer is sent again.
                    // A gRPC request's trailers-only answer is retried by
                    // its grpc-status.
                    let retry_on = route.retry.as_ref().is_some_and(|r| {
                        r.codes.contains(&status.as_u16())
                            || (super::grpc::is_grpc(&out.headers)
                                && super::grpc::retriable(&resp, &r.grpc_codes))
                    }) && out.body.replayable();
                    if !self.may_retry(route, &up, &mut at, retry_on) {
                        if retry_on && at.max > 1 && rec.flag == Flag::None {
                            rec.flag = Flag::URX;
                        }
                        let lease = (out.proto == Proto::Http1).then_some((lease, up.limits));
                        return Ok((resp, lease, admitted));
                    }
                    rec.retries += 1;
                    (None, true)
                }
                Some(Err(e)) => {
                    // The client's body failed (too large, idle, reset):
                    // the client's fault, answered as such, never retried.
                    if let Some(f) = out.body.failure() {
                        return Err(body_failure(f, rec));
                    }
                    let (f, resend) = upstream_failure(e, target, &out.method, rec)?;
                    self.balancer
                        .observe(&ep_stats, true, up.policy.outlier.as_ref(), endpoints);
                    (
                        Some(f),
                        route.retry.is_some() && resend && out.body.replayable(),
                    )
                }
                None => {
                    let overall = at.deadline.is_some_and(|d| Instant::now() >= d);
                    rec.detail = format!("{target}: no response within {per_try:?}");
                    (
                        Some(TIMED_OUT),
                        route.retry.is_some()
                            && !overall
                            && idempotent(&out.method)
                            && out.body.replayable(),
                    )
                }
            };
            if let Some(f) = failure {
                if !self.may_retry(route, &up, &mut at, retriable) {
                    // A retriable failure that was not retried: the retry
                    // limit or budget was reached.
                    if retriable && route.retry.as_ref().is_some_and(|r| r.attempts > 0) {
                        rec.flag_extra = Some(Flag::URX);
                    }
                    return Err(f);
                }
                rec.retries += 1;
            }
            let base = route
                .retry
                .as_ref()
                .map(|r| r.backoff)
                .unwrap_or(Duration::from_millis(25));
            let wait = backoff(base, at.made);
            if at.deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Err(TIMED_OUT);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The backend a request goes to: its endpoints, policy and counters,
    /// and the request's max_requests slot; or what to answer when there is
    /// no such backend, no endpoint, or no room.
    fn upstream(
        &self,
        ds: &Downstream,
        backend: &Backend,
        rec: &mut Recorder,
    ) -> Result<(Upstream, Held), Failure> {
        let Some(dest) = self.resolve(&backend.service) else {
            rec.detail = format!("backend service {} is unknown", backend.service);
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                Flag::NR,
                "unknown backend service\n",
            ));
        };
        if let Some(svc) = &dest.service {
            rec.set_destination_service(svc);
        }
        if dest.endpoints.is_empty() {
            rec.detail = format!("{} has no healthy endpoints", backend.service);
            return Err(NO_HEALTHY);
        }
        let policy = self
            .routes
            .get(&backend.service)
            .map(|s| s.backend.clone())
            .unwrap_or_default();
        let stats = self.balancer.backend(&backend.service);
        // The request's max_requests slot: held until its response body
        // ends (the body carries it), not just until the headers.
        let Some(admitted) = self.balancer.admit(&stats, &policy) else {
            rec.detail = format!(
                "{} is at max_requests {}",
                backend.service, policy.max_requests
            );
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::UO,
                "upstream overflow\n",
            ));
        };
        let limits = conn_limits(&policy);
        let port = if backend.port == 0 {
            ds.target.port()
        } else {
            backend.port
        };
        let up = Upstream {
            dest,
            policy,
            stats,
            limits,
            port,
        };
        Ok((up, admitted))
    }

    /// One attempt: a connection to `target` (reused or new), the request
    /// sent, the response head back.
    pub(super) async fn send_once(
        &self,
        backend: &str,
        limits: &ConnLimits,
        endpoint: &Workload,
        target: SocketAddr,
        headers: &ConnectHeaders,
        out: &Outgoing,
    ) -> Result<(crate::upstream::Lease, Response<Incoming>), UpstreamError> {
        let mut lease = self
            .upstreams
            .checkout(
                backend,
                limits,
                Dial {
                    endpoint,
                    target,
                    proto: out.proto,
                    headers,
                },
            )
            .await?;
        let req = out.request()?;
        let resp = lease.send(req).await?;
        Ok((lease, resp))
    }

    /// Whether one more attempt is allowed after one that `wants` another:
    /// attempts left, time left and room in the retry budget (the slot is
    /// held through the retry).
    fn may_retry(&self, route: &Route, up: &Upstream, at: &mut Attempts, wants: bool) -> bool {
        if !wants || at.made >= at.max {
            return false;
        }
        let Some(r) = &route.retry else { return false };
        if at.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        if at.retry_slot.is_some() {
            return true;
        }
        match self.balancer.retry_slot(
            &up.stats,
            r.budget_percent,
            r.min_retry_concurrency,
            up.policy.max_retries,
        ) {
            Some(s) => {
                at.retry_slot = Some(s);
                true
            }
            None => false,
        }
    }
}

/// What [`Waypoint::forward`] brings back: the upstream response head, the
/// HTTP/1 connection to return to its pool when the body ends, and the
/// request's max_requests slot (the body holds it until it ends).
pub(super) type Forwarded = (Response<Incoming>, Option<(Lease, ConnLimits)>, Held);

/// What to answer instead of an upstream response.
pub(super) type Failure = (StatusCode, Flag, &'static str);

const NO_HEALTHY: Failure = (
    StatusCode::SERVICE_UNAVAILABLE,
    Flag::UH,
    "no healthy upstream\n",
);

const TIMED_OUT: Failure = (
    StatusCode::GATEWAY_TIMEOUT,
    Flag::UT,
    "upstream request timeout\n",
);

/// One backend as a request's attempts see it.
struct Upstream {
    dest: Resolved,
    policy: BackendPolicy,
    stats: Arc<BackendStats>,
    limits: ConnLimits,
    /// The port the request was for (mapped per endpoint).
    port: u16,
}

/// Where a request's attempts stand.
struct Attempts {
    /// The route's overall timeout.
    deadline: Option<Instant>,
    /// How many may be made, the first one included.
    max: u32,
    /// How many have been made.
    made: u32,
    /// The endpoints tried already (by uid).
    tried: Vec<String>,
    /// The retry budget's slot, once a retry has taken it.
    retry_slot: Option<Held>,
}

/// An attempt that failed without a response: what to answer if no other
/// attempt follows, and whether the request may be sent again; `Err` when
/// it must be answered now.
fn upstream_failure(
    e: UpstreamError,
    target: SocketAddr,
    method: &Method,
    rec: &mut Recorder,
) -> Result<(Failure, bool), Failure> {
    match e {
        UpstreamError::BadRequest(why) => {
            rec.detail = why;
            Err((StatusCode::BAD_REQUEST, Flag::None, "bad request\n"))
        }
        UpstreamError::Body(b) => Err(body_failure(b, rec)),
        UpstreamError::Overflow(b) => {
            rec.detail = format!("{b}: max pending requests");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::UO,
                "upstream overflow\n",
            ))
        }
        e => {
            let flag = match e {
                UpstreamError::Connect(_) | UpstreamError::Handshake(_) => Flag::UF,
                _ => Flag::UR,
            };
            // A reset may come after the backend acted on the request: only
            // idempotent methods are sent again.
            let safe_to_resend = flag == Flag::UF || idempotent(method);
            rec.detail = format!("{target}: {e}");
            Ok((
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    flag,
                    "upstream connect error or reset\n",
                ),
                safe_to_resend,
            ))
        }
    }
}

/// What to answer when the client's request body failed.
fn body_failure(e: BodyError, rec: &mut Recorder) -> Failure {
    rec.detail = e.to_string();
    match e {
        BodyError::TooLarge(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Flag::None,
            "request body too large\n",
        ),
        BodyError::Idle(_) => (
            StatusCode::REQUEST_TIMEOUT,
            Flag::None,
            "request body timeout\n",
        ),
        BodyError::Client(_) => (StatusCode::BAD_REQUEST, Flag::DC, "bad request body\n"),
        BodyError::Superseded | BodyError::NotReplayable => (
            StatusCode::SERVICE_UNAVAILABLE,
            Flag::UR,
            "upstream connect error or reset\n",
        ),
    }
}

/// The request as it goes upstream; its body streams, kept for another
/// attempt while it fits the retry buffer.
#[derive(Clone)]
pub(super) struct Outgoing {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) authority: String,
    pub(super) headers: HeaderMap,
    pub(super) body: RetryBuffer,
    pub(super) proto: Proto,
    /// The protocol an upgrade asks for (`websocket`).
    pub(super) upgrade: Option<String>,
}

impl Outgoing {
    /// The request to send; an error when its authority and path do not
    /// make a URI (answered 400, never sent as something else) or its body
    /// cannot be sent (again).
    fn request(&self) -> Result<Request<RequestBody>, UpstreamError> {
        let uri = match self.proto {
            Proto::Http1 => Uri::try_from(self.path.as_str()).map_err(http::Error::from),
            // Built from its parts, never by pasting strings: an authority
            // can never move into the path.
            Proto::Http2 => Uri::builder()
                .scheme("http")
                .authority(self.authority.as_str())
                .path_and_query(self.path.as_str())
                .build(),
        }
        .map_err(|e| UpstreamError::BadRequest(format!("{}{}: {e}", self.authority, self.path)))?;
        let mut req = Request::new(self.body.attempt().map_err(UpstreamError::Body)?);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        match self.proto {
            Proto::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                if let Ok(v) = HeaderValue::from_str(&self.authority) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            Proto::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(header::HOST);
            }
        }
        if let Some(t) = &self.upgrade {
            super::upgrade::upstream_request(&mut req, t, self.proto);
        }
        Ok(req)
    }
}

/// The connection limits of a backend's DestinationRule.
pub(super) fn conn_limits(policy: &BackendPolicy) -> ConnLimits {
    ConnLimits {
        max_connections: policy.max_connections,
        max_pending: policy.max_pending_requests,
        max_requests_per_connection: policy.max_requests_per_connection,
        idle_timeout: policy.idle_timeout.unwrap_or(Duration::from_secs(60)),
        connect_timeout: policy.connect_timeout,
    }
}

/// Methods that may be sent twice without a second effect (RFC 9110 9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Jittered exponential backoff: base * 2^(n-1), between half and all of
/// it, capped at ten times the base.
fn backoff(base: Duration, retry: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << (retry.saturating_sub(1)).min(10));
    let cap = base.saturating_mul(10);
    exp.min(cap).mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let base = Duration::from_millis(25);
        for n in 1..20 {
            let b = backoff(base, n);
            assert!(b <= base * 10, "{b:?}");
            assert!(b >= base / 2, "{b:?}");
        }
    }
}
