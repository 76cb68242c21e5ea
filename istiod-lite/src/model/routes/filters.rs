//! An HTTPRoute rule's filters (header edits, redirects, rewrites) as the
//! waypoint's `Filter`.

use gateway_api::apis::experimental::httproutes::HttpRouteRulesFilters;
use mesh_proto::mesh::waypoint as pb;

use super::errors::RouteError;

pub(super) fn headers<'a>(v: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<pb::Header> {
    v.map(|(n, v)| pb::Header {
        name: n.to_ascii_lowercase(),
        value: v.into(),
    })
    .collect()
}

/// Builds a HeaderEdit from any of Gateway API's (structurally identical)
/// header-modifier types.
macro_rules! header_edit {
    ($m:expr) => {{
        let m = $m;
        pb::HeaderEdit {
            set: headers(
                m.set
                    .iter()
                    .flatten()
                    .map(|h| (h.name.as_str(), h.value.as_str())),
            ),
            add: headers(
                m.add
                    .iter()
                    .flatten()
                    .map(|h| (h.name.as_str(), h.value.as_str())),
            ),
            remove: m
                .remove
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }};
}

macro_rules! path_modifier {
    ($p:expr) => {{
        let p = $p;
        match (&p.replace_full_path, &p.replace_prefix_match) {
            (Some(f), _) => Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplaceFullPath(f.clone())),
            }),
            (None, Some(x)) => Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch(x.clone())),
            }),
            (None, None) => None,
        }
    }};
}

/// A filter type as the user wrote it ("CORS", not the Rust variant).
pub(super) fn type_name(t: &impl serde::Serialize) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "(unknown)".into(),
    }
}

pub(super) fn filter(f: &HttpRouteRulesFilters) -> Result<pb::Filter, RouteError> {
    use pb::filter::Kind;
    let kind = if let Some(m) = &f.request_header_modifier {
        Kind::RequestHeaders(header_edit!(m))
    } else if let Some(m) = &f.response_header_modifier {
        Kind::ResponseHeaders(header_edit!(m))
    } else if let Some(r) = &f.request_redirect {
        let scheme = r
            .scheme
            .as_ref()
            .map(|s| format!("{s:?}").to_ascii_lowercase())
            .unwrap_or_default();
        let status_code = match r.status_code.unwrap_or(302) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u32,
            c => return Err(RouteError::RedirectStatus(c)),
        };
        Kind::Redirect(pb::Redirect {
            scheme,
            hostname: r.hostname.clone().unwrap_or_default(),
            port: r.port.unwrap_or(0).max(0) as u32,
            path: r.path.as_ref().and_then(|p| path_modifier!(p)),
            status_code,
        })
    } else if let Some(r) = &f.url_rewrite {
        Kind::Rewrite(pb::Rewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().and_then(|p| path_modifier!(p)),
        })
    } else {
        return Err(RouteError::Filter(type_name(&f.r#type)));
    };
    Ok(pb::Filter { kind: Some(kind) })
}
