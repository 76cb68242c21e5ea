//! The debug endpoint (`--debug-addr`, 127.0.0.1:15014 by default): the
//! whole config model, every proxy connection and the config problems, and
//! `/ready` and `/healthz`. It binds loopback unless the operator gives a
//! bearer token (`--debug-token-file`): a non-loopback address without one
//! stops the start, and with one a caller from anywhere but loopback must
//! present it for `/debug/*`. A loopback caller (a port-forward, a shell in
//! the pod or its netns) needs none. `/ready` and `/healthz` say nothing
//! about the mesh and answer everyone; a separate `--health-addr` serves only
//! those two, for probes from the node.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::admin::{Peer, respond};
use tracing::warn;

use crate::ca::auth::constant_time_eq;
use crate::config::folder::ConfigIssue;
use crate::xds::Hub;

/// Shortest token accepted.
const MIN_TOKEN: usize = 16;

/// Who may read `/debug/*`.
#[derive(Clone)]
pub struct DebugAccess {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for DebugAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugAccess")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugAccessError {
    #[error(
        "--debug-addr {0} is not a loopback address: the debug endpoint shows the whole mesh, so give --debug-token-file too (or bind 127.0.0.1)"
    )]
    Exposed(SocketAddr),
    #[error("--debug-token-file {path}: {reason}")]
    Token { path: String, reason: String },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NoToken,
    WrongToken,
}

impl DebugAccess {
    /// Reads the token file, and refuses a non-loopback `addr` without one.
    pub fn new(addr: SocketAddr, token_file: Option<&Path>) -> Result<Self, DebugAccessError> {
        let token = match token_file {
            Some(path) => {
                let err = |reason: String| DebugAccessError::Token {
                    path: path.display().to_string(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                let t = text.trim();
                if t.len() < MIN_TOKEN || t.contains(char::is_whitespace) {
                    return Err(err(format!(
                        "the token must be at least {MIN_TOKEN} characters, without spaces"
                    )));
                }
                Some(Arc::from(t))
            }
            None => None,
        };
        if token.is_none() && !addr.ip().to_canonical().is_loopback() {
            return Err(DebugAccessError::Exposed(addr));
        }
        Ok(DebugAccess { token })
    }

    /// Whether a request from `peer` with `headers` may read `/debug/*`:
    /// loopback always; anyone else with the token. An unknown peer is not
    /// loopback.
    pub fn check(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), Refused> {
        if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
            return Ok(());
        }
        let Some(token) = &self.token else {
            return Err(Refused::NoToken);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Refused::NoToken)?;
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Refused::WrongToken)
        }
    }
}

fn json(v: serde_json::Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )
}

/// `/ready` and `/healthz`, or None for any other path. `/ready`'s body
/// names the kinds that are not served (the mesh is served without them)
/// or that it waits for.
fn health(hub: &Hub, path: &str) -> Option<Response<Full<Bytes>>> {
    let lines = |head: &str, kinds: Vec<String>| {
        let mut body = format!("{head}\n");
        for k in kinds {
            body.push_str(&format!("  {k}\n"));
        }
        body
    };
    match path {
        "/ready" if hub.is_ready() => {
            let not_served = hub.sources().not_listed();
            let body = if not_served.is_empty() {
                "ready\n".to_string()
            } else {
                lines("ready; served without:", not_served)
            };
            Some(respond(StatusCode::OK, "text/plain", body))
        }
        "/ready" => Some(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            lines(
                "still loading the config; waiting for:",
                hub.sources().unsettled(),
            ),
        )),
        "/healthz" => Some(respond(StatusCode::OK, "text/plain", "ok\n")),
        // No secrets: counts and timings only (Prometheus scrapes it on the
        // health listener).
        "/metrics" => Some(respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::metrics().render(hub.connected(), hub.model().object_counts()),
        )),
        _ => None,
    }
}

/// The health listener's handler: `/ready`, `/healthz` and `/metrics` only.
pub fn health_handler(
    hub: Arc<Hub>,
) -> impl Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static {
    move |req| {
        health(&hub, req.uri().path()).unwrap_or_else(|| {
            respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /ready, /healthz or /metrics\n",
            )
        })
    }
}

/// The debug listener's handler.
pub fn debug_handler(
    hub: Arc<Hub>,
    issues: Arc<Mutex<Vec<ConfigIssue>>>,
    access: DebugAccess,
) -> impl Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static {
    move |req| {
        let path = req.uri().path();
        if let Some(r) = health(&hub, path) {
            return r;
        }
        // The version is no secret (as /ready is not).
        if path == "/version" {
            return json(serde_json::json!({
                "component": "istiod-lite",
                "version": env!("CARGO_PKG_VERSION"),
            }));
        }
        let peer = req.extensions().get::<Peer>().map(|p| p.0);
        if let Err(why) = access.check(peer, req.headers()) {
            warn!(peer = ?peer, path, reason = ?why, "debug request refused: not from loopback, and without the debug token");
            let mut r = respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "the debug endpoint needs the bearer token of --debug-token-file from anywhere but loopback\n",
            );
            if let Ok(v) = "Bearer".parse() {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return r;
        }
        match path {
            "/debug/model" => json(hub.model().dump()),
            "/debug/connections" => json(hub.connections()),
            "/debug/config" => json(serde_json::json!({
                "issues": *issues.lock().unwrap_or_else(|p| p.into_inner()),
                "model_issues": hub.model().issues(),
                "sources": hub.sources().snapshot(),
            })),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /debug/model, /debug/connections, /debug/config, /version\n",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_non_loopback_address_needs_a_token_file() {
        let any: SocketAddr = "0.0.0.0:15014".parse().unwrap();
        assert_eq!(
            DebugAccess::new(any, None).unwrap_err(),
            DebugAccessError::Exposed(any)
        );
        for lo in ["127.0.0.1:15014", "[::1]:15014"] {
            assert!(DebugAccess::new(lo.parse().unwrap(), None).is_ok(), "{lo}");
        }
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        assert!(matches!(
            DebugAccess::new(any, Some(&short)),
            Err(DebugAccessError::Token { .. })
        ));
    }

    #[test]
    fn only_loopback_or_the_token_reads_the_debug_pages() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "debug-token-0123456789\n").unwrap();
        let a = DebugAccess::new("0.0.0.0:15014".parse().unwrap(), Some(&file)).unwrap();
        let far: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let none = HeaderMap::new();
        assert_eq!(a.check(Some(far), &none), Err(Refused::NoToken));
        assert_eq!(a.check(None, &none), Err(Refused::NoToken));
        assert_eq!(
            a.check(Some(far), &bearer("debug-token-0123456788")),
            Err(Refused::WrongToken)
        );
        assert_eq!(
            a.check(Some(far), &bearer("debug-token-0123456789")),
            Ok(())
        );
        for lo in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
            assert_eq!(a.check(Some(lo.parse().unwrap()), &none), Ok(()), "{lo}");
        }
    }
}
