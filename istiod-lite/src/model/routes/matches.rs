//! An HTTPRoute rule's matches as the waypoint's `RouteMatch`.

use gateway_api::apis::experimental::httproutes::{
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod,
    HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
};
use mesh_proto::mesh::waypoint as pb;
use pb::string_match::Kind as SM;

use super::errors::RouteError;

pub(super) fn string_match(kind: SM) -> pb::StringMatch {
    pb::StringMatch { kind: Some(kind) }
}

fn method(m: &HttpRouteRulesMatchesMethod) -> &'static str {
    use HttpRouteRulesMatchesMethod as M;
    match m {
        M::Get => "GET",
        M::Head => "HEAD",
        M::Post => "POST",
        M::Put => "PUT",
        M::Delete => "DELETE",
        M::Connect => "CONNECT",
        M::Options => "OPTIONS",
        M::Trace => "TRACE",
        M::Patch => "PATCH",
    }
}

fn regex_ok(r: &str) -> Result<(), RouteError> {
    // The waypoint compiles with the same crate and the same whole-string
    // wrapping, so what passes here runs there.
    regex::Regex::new(&format!("^(?:{r})$"))
        .map(|_| ())
        .map_err(|source| RouteError::Regex {
            regex: r.to_string(),
            source,
        })
}

fn name_value(name: String, value: &str, regex: bool) -> Result<pb::HeaderMatch, RouteError> {
    let kind = if regex {
        regex_ok(value)?;
        SM::Regex(value.into())
    } else {
        SM::Exact(value.into())
    };
    Ok(pb::HeaderMatch {
        name,
        value: Some(string_match(kind)),
    })
}

pub(super) fn request_match(m: &HttpRouteRulesMatches) -> Result<pb::RouteMatch, RouteError> {
    let path = match &m.path {
        None => None,
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            Some(string_match(
                match p
                    .r#type
                    .as_ref()
                    .unwrap_or(&HttpRouteRulesMatchesPathType::PathPrefix)
                {
                    HttpRouteRulesMatchesPathType::Exact => SM::Exact(v),
                    HttpRouteRulesMatchesPathType::PathPrefix => {
                        // "/a/" and "/a" match the same paths.
                        let t = v.trim_end_matches('/');
                        SM::Prefix(if t.is_empty() { "/".into() } else { t.into() })
                    }
                    HttpRouteRulesMatchesPathType::RegularExpression => {
                        regex_ok(&v)?;
                        SM::Regex(v)
                    }
                },
            ))
        }
    };
    // Header and query matches have distinct generated types of one shape.
    macro_rules! name_values {
        ($list:expr, $regex:path, $name:expr) => {
            $list
                .iter()
                .flatten()
                .map(|h| name_value($name(&h.name), &h.value, matches!(h.r#type, Some($regex))))
                .collect::<Result<Vec<_>, _>>()?
        };
    }
    let headers = name_values!(
        m.headers,
        HttpRouteRulesMatchesHeadersType::RegularExpression,
        |n: &String| n.to_ascii_lowercase()
    );
    // Query parameter names are case-sensitive, unlike header names.
    let query_params = name_values!(
        m.query_params,
        HttpRouteRulesMatchesQueryParamsType::RegularExpression,
        String::clone
    );
    Ok(pb::RouteMatch {
        path,
        headers,
        query_params,
        method: m.method.as_ref().map(method).unwrap_or_default().into(),
    })
}
