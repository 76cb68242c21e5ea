//! What a route changes on the way through: request and response header
//! edits, host and path rewrites, and the hop-by-hop headers that never
//! travel on.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use mesh_proto::mesh::waypoint as pb;

use crate::routes::{Route, StrMatch};

/// The route's filters on what goes upstream: request header edits, the
/// host and path rewrites. The path and authority to send, and the
/// response header edits to make on the way back.
pub(super) fn rewrite(
    route: &Route,
    parts: &mut Parts,
    host: &str,
) -> (String, String, Vec<pb::HeaderEdit>) {
    let mut path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut authority = host.to_string();
    let mut response_edits: Vec<pb::HeaderEdit> = Vec::new();
    for f in &route.filters {
        match f {
            pb::filter::Kind::RequestHeaders(e) => edit_headers(&mut parts.headers, e),
            pb::filter::Kind::ResponseHeaders(e) => response_edits.push(e.clone()),
            pb::filter::Kind::Rewrite(r) => {
                if !r.hostname.is_empty() {
                    authority = r.hostname.clone();
                }
                if let Some(m) = &r.path {
                    let (p, q) = match path.split_once('?') {
                        Some((p, q)) => (p.to_string(), Some(q.to_string())),
                        None => (path.clone(), None),
                    };
                    let np = modify_path(&p, m, matched_prefix(route));
                    path = match q {
                        Some(q) => format!("{np}?{q}"),
                        None => np,
                    };
                }
            }
            pb::filter::Kind::Redirect(_) => {}
        }
    }
    (path, authority, response_edits)
}

/// `Trailer` is not among them: it names the trailers a message ends
/// with, end to end (RFC 9110 6.6.2), and an HTTP/1.1 hop sends only the
/// trailers it names.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    // gRPC needs `te: trailers`; every other TE value is hop-by-hop.
    let trailers = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

pub(super) fn edit_headers(h: &mut HeaderMap, e: &pb::HeaderEdit) {
    for kv in &e.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(kv.name.as_bytes()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.insert(n, v);
        }
    }
    for kv in &e.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(kv.name.as_bytes()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.append(n, v);
        }
    }
    for n in &e.remove {
        h.remove(n.as_str());
    }
}

/// The rewritten path for a `ReplacePrefixMatch` or `ReplaceFullPath`.
pub(super) fn modify_path(
    path: &str,
    m: &pb::PathModifier,
    matched_prefix: Option<&str>,
) -> String {
    match &m.kind {
        Some(pb::path_modifier::Kind::ReplaceFullPath(p)) => p.clone(),
        Some(pb::path_modifier::Kind::ReplacePrefixMatch(rep)) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let rep = rep.trim_end_matches('/');
            let joined = format!("{rep}{rest}");
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
        None => path.to_string(),
    }
}

pub(super) fn matched_prefix(route: &Route) -> Option<&str> {
    match route.matcher.as_ref()?.path.as_ref()? {
        StrMatch::Prefix(p) => Some(p.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rewrites_follow_gateway_api() {
        let prefix = |s: &str| pb::PathModifier {
            kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch(s.into())),
        };
        assert_eq!(
            modify_path("/foo/bar", &prefix("/xyz"), Some("/foo")),
            "/xyz/bar"
        );
        assert_eq!(modify_path("/foo/bar", &prefix("/"), Some("/foo")), "/bar");
        assert_eq!(modify_path("/foo", &prefix("/"), Some("/foo")), "/");
        assert_eq!(modify_path("/foo", &prefix("/xyz"), Some("/foo/")), "/xyz");
        let full = pb::PathModifier {
            kind: Some(pb::path_modifier::Kind::ReplaceFullPath("/new".into())),
        };
        assert_eq!(modify_path("/foo/bar", &full, Some("/foo")), "/new");
    }

    #[test]
    fn hop_by_hop_headers_do_not_travel() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().expect("v"));
        h.insert("x-secret", "1".parse().expect("v"));
        h.insert("transfer-encoding", "chunked".parse().expect("v"));
        h.insert("x-keep", "1".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
