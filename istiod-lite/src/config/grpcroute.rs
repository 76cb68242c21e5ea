//! Gateway API `GRPCRoute`, read as the `HTTPRoute` it amounts to: a gRPC
//! method is the path `/<service>/<method>`, so each method match becomes
//! a path match (exact or regular expression), header matches,
//! weighted backends and filters (header modifiers, mirror, extension
//! references) carry over as they are, and the waypoint and the ingress
//! route it as they route any HTTPRoute. The route's model name is
//! `grpc:<name>`, a name no HTTPRoute can have, so a GRPCRoute and an
//! HTTPRoute of the same name are both kept.

use serde_json::{Map, Value, json};

/// Why a GRPCRoute document cannot be read as an HTTPRoute.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcRouteError {
    #[error("not an object")]
    NotAnObject,
    /// It would name another split of the path into service and method.
    #[error("an exact service or method cannot contain '/'")]
    SlashInExact,
    #[error("method match type {0:?} is not supported")]
    MethodMatchType(String),
}

/// Why a watched GRPCRoute could not be read as an HTTPRoute.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Grpc(#[from] GrpcRouteError),
}

/// A GRPCRoute from the API server as the HTTPRoute it amounts to. One
/// that cannot be read so (it cannot happen with the typed GRPCRoute's
/// match types) keeps its name and loses its rules, and is logged.
pub fn as_http_route(
    g: &gateway_api::apis::experimental::grpcroutes::GrpcRoute,
) -> gateway_api::apis::experimental::httproutes::HttpRoute {
    use gateway_api::apis::experimental::httproutes::{HttpRoute, HttpRouteSpec};
    let converted = || -> Result<HttpRoute, Unreadable> {
        let v = to_http_route(&serde_json::to_value(g)?)?;
        Ok(serde_json::from_value(v)?)
    };
    let converted = converted();
    converted.unwrap_or_else(|e| {
        let mut metadata = g.metadata.clone();
        let name = metadata.name.clone().unwrap_or_default();
        tracing::warn!(route = %name, error = %e, "GRPCRoute not readable as routes; its rules are left out");
        metadata.name = Some(model_name(&name));
        HttpRoute {
            metadata,
            spec: HttpRouteSpec::default(),
            status: None,
        }
    })
}

/// The model name of GRPCRoute `name`.
pub fn model_name(name: &str) -> String {
    format!("grpc:{name}")
}

/// The GRPCRoute's own name when `model_name` is one's model name.
pub fn grpc_route_name(model_name: &str) -> Option<&str> {
    model_name.strip_prefix("grpc:")
}

/// Escapes a literal for a regular expression (RE2 and Rust's `regex`).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The path match a GRPCRoute method match stands for; None matches every
/// method. Each part stays within its own path segment: an exact service
/// or method with a `/` is refused (it would name another split of the
/// path), and a regular expression is grouped so an alternation in it
/// cannot reach past its segment.
fn path_match(m: &Value) -> Result<Option<Value>, GrpcRouteError> {
    let kind = m.get("type").and_then(Value::as_str).unwrap_or("Exact");
    let service = m.get("service").and_then(Value::as_str);
    let method = m.get("method").and_then(Value::as_str);
    if kind == "Exact" && [service, method].iter().flatten().any(|p| p.contains('/')) {
        return Err(GrpcRouteError::SlashInExact);
    }
    let (t, v) = match (kind, service, method) {
        (_, None, None) => return Ok(None),
        ("Exact", Some(s), Some(me)) => ("Exact", format!("/{s}/{me}")),
        ("Exact", Some(s), None) => ("RegularExpression", format!("/{}/[^/]+", escape(s))),
        ("Exact", None, Some(me)) => ("RegularExpression", format!("/[^/]+/{}", escape(me))),
        ("RegularExpression", s, me) => (
            "RegularExpression",
            format!(
                "/(?:{})/(?:{})",
                s.unwrap_or("[^/]+"),
                me.unwrap_or("[^/]+")
            ),
        ),
        (other, _, _) => return Err(GrpcRouteError::MethodMatchType(other.to_string())),
    };
    Ok(Some(json!({"type": t, "value": v})))
}

/// The HTTPRoute document a GRPCRoute document stands for.
pub fn to_http_route(v: &Value) -> Result<Value, GrpcRouteError> {
    let mut out = v.clone();
    let obj = out.as_object_mut().ok_or(GrpcRouteError::NotAnObject)?;
    obj.insert("kind".into(), json!("HTTPRoute"));
    if let Some(n) = obj.get_mut("metadata").and_then(|m| m.get_mut("name"))
        && let Some(s) = n.as_str()
    {
        *n = json!(model_name(s));
    }
    let rules = obj
        .get_mut("spec")
        .and_then(|s| s.get_mut("rules"))
        .and_then(Value::as_array_mut);
    for rule in rules.into_iter().flatten() {
        let Some(matches) = rule.get_mut("matches").and_then(Value::as_array_mut) else {
            continue;
        };
        for m in matches.iter_mut() {
            let Some(mo) = m.as_object_mut() else {
                continue;
            };
            let mut http = Map::new();
            if let Some(method) = mo.get("method")
                && let Some(p) = path_match(method)?
            {
                http.insert("path".into(), p);
            }
            if let Some(h) = mo.get("headers") {
                http.insert("headers".into(), h.clone());
            }
            *m = Value::Object(http);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_matches_become_path_matches() {
        let m = |v: Value| path_match(&v).expect("supported");
        assert_eq!(
            m(json!({"service": "shop.Cart", "method": "Add"})),
            Some(json!({"type": "Exact", "value": "/shop.Cart/Add"}))
        );
        assert_eq!(
            m(json!({"method": "Add.V2"})),
            Some(json!({"type": "RegularExpression", "value": "/[^/]+/Add\\.V2"}))
        );
        assert_eq!(
            m(json!({"type": "RegularExpression", "service": "shop\\..*"})),
            Some(json!({"type": "RegularExpression", "value": "/(?:shop\\..*)/(?:[^/]+)"}))
        );
        assert_eq!(m(json!({})), None);
        assert_eq!(
            path_match(&json!({"type": "Prefix", "method": "x"})),
            Err(GrpcRouteError::MethodMatchType("Prefix".into()))
        );
    }

    /// A method match never reaches past its own path segment: a user's
    /// alternation stays inside its group, and a `/` in an exact service or
    /// method (which would split the path elsewhere) is refused.
    #[test]
    fn a_method_match_stays_within_its_segment() {
        let m = |v: Value| path_match(&v).expect("supported");
        assert_eq!(
            m(json!({"type": "RegularExpression", "service": "a|b", "method": "X"})),
            Some(json!({"type": "RegularExpression", "value": "/(?:a|b)/(?:X)"}))
        );
        assert_eq!(
            m(json!({"service": "shop.Cart"})),
            Some(json!({"type": "RegularExpression", "value": "/shop\\.Cart/[^/]+"}))
        );
        for bad in [
            json!({"service": "a/b", "method": "X"}),
            json!({"service": "a", "method": "X/Y"}),
            json!({"method": "X/Y"}),
        ] {
            assert_eq!(path_match(&bad), Err(GrpcRouteError::SlashInExact), "{bad}");
        }
    }

    #[test]
    fn a_grpcroute_reads_as_an_httproute() {
        let g = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "echo", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                "rules": [{
                    "matches": [{"method": {"service": "labecho.Echo", "method": "Unary"},
                                 "headers": [{"name": "x-v", "value": "2"}]}],
                    "backendRefs": [{"name": "echo-v2", "port": 80, "weight": 1}]
                }]
            }
        });
        let h = to_http_route(&g).expect("converted");
        assert_eq!(h["kind"], "HTTPRoute");
        assert_eq!(h["metadata"]["name"], "grpc:echo");
        assert_eq!(
            h["spec"]["rules"][0]["matches"][0],
            json!({"path": {"type": "Exact", "value": "/labecho.Echo/Unary"},
                   "headers": [{"name": "x-v", "value": "2"}]})
        );
        assert_eq!(h["spec"]["rules"][0]["backendRefs"][0]["name"], "echo-v2");
    }

    #[test]
    fn a_watched_grpcroute_reads_as_an_httproute_too() {
        let g: gateway_api::apis::experimental::grpcroutes::GrpcRoute =
            serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GRPCRoute",
                "metadata": {"name": "echo", "namespace": "shop"},
                "spec": {"rules": [{"matches": [{"method": {"type": "Exact", "service": "a.B"}}],
                                    "backendRefs": [{"name": "b", "port": 80}]}]}
            }))
            .expect("a GRPCRoute");
        let h = as_http_route(&g);
        assert_eq!(h.metadata.name.as_deref(), Some("grpc:echo"));
        let rules = h.spec.rules.expect("rules");
        let path = rules[0].matches.as_ref().expect("matches")[0]
            .path
            .as_ref()
            .expect("a path match");
        assert_eq!(path.value.as_deref(), Some("/a\\.B/[^/]+"));
    }
}
