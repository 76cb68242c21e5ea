//! An HTTPRoute rule's backends: weighted Services and the mirror backend.
//! One in another namespace than the route's is left out (and noted)
//! unless a ReferenceGrant there permits it (see `grants.rs`).

use gateway_api::apis::experimental::httproutes::{
    HttpRouteRules, HttpRouteRulesFiltersRequestMirror,
};
use mesh_proto::mesh::waypoint as pb;

use super::errors::{BackendRefError, PercentError, RouteError};
use super::filters::{headers, type_name};
use super::{ALL, Scope, permits};

/// Whether the route may reach Service `name` in `namespace` (the route's
/// own when unset); if not, `what` is noted with why it is left out.
fn permitted(
    scope: Scope<'_>,
    namespace: Option<&str>,
    name: &str,
    what: &str,
    notes: &mut Vec<String>,
) -> bool {
    let ns = namespace.unwrap_or(scope.referrer.namespace);
    let ok = permits(scope.grants, scope.referrer, ns, name);
    if !ok {
        notes.push(format!(
            "{what} {ns}/{name} is in another namespace and no ReferenceGrant there permits it; {}",
            if what == "backend" {
                "its share of requests is answered 500"
            } else {
                "the mirror is left out"
            }
        ));
    }
    ok
}

/// A Service reference ("namespace/hostname", port), as backendRefs and
/// mirror backendRefs both name one.
fn service_ref(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    route_ns: &str,
    domain_suffix: &str,
) -> Result<(String, u32), BackendRefError> {
    let (group, kind) = (group.unwrap_or(""), kind.unwrap_or("Service"));
    if kind != "Service" || !group.is_empty() {
        return Err(BackendRefError::NotAService {
            name: name.to_string(),
            kind: if group.is_empty() {
                kind.to_string()
            } else {
                format!("{group}/{kind}")
            },
        });
    }
    let Some(port) = port else {
        return Err(BackendRefError::NoPort {
            name: name.to_string(),
        });
    };
    let ns = namespace.unwrap_or(route_ns);
    Ok((
        format!("{ns}/{name}.{ns}.svc.{domain_suffix}"),
        port.max(0) as u32,
    ))
}

/// The rule's backends the route may reach, each noted that it may not.
pub(super) fn backends(
    rule: &HttpRouteRules,
    scope: Scope<'_>,
    notes: &mut Vec<String>,
) -> Result<Vec<pb::WeightedBackend>, RouteError> {
    let mut out = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        let (service, port) = service_ref(
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
            scope.referrer.namespace,
            scope.domain_suffix,
        )?;
        let weight = b.weight.unwrap_or(1).max(0) as u32;
        if !permitted(scope, b.namespace.as_deref(), &b.name, "backend", notes) {
            // Its share is answered 500; nothing of it is sent anywhere.
            out.push(pb::WeightedBackend {
                weight,
                invalid: true,
                ..Default::default()
            });
            continue;
        }
        let (mut req, mut resp) = (None, None);
        for f in b.filters.iter().flatten() {
            if let Some(m) = &f.request_header_modifier {
                req = Some(header_edit!(m));
            } else if let Some(m) = &f.response_header_modifier {
                resp = Some(header_edit!(m));
            } else {
                return Err(RouteError::BackendFilter {
                    backend: b.name.clone(),
                    filter: type_name(&f.r#type),
                });
            }
        }
        out.push(pb::WeightedBackend {
            service,
            port,
            weight,
            request_headers: req,
            response_headers: resp,
            invalid: false,
        });
    }
    Ok(out)
}

/// A share in percent (0-100, fractions allowed) in millionths.
pub(super) fn percent_per_million(field: &'static str, v: f64) -> Result<u32, PercentError> {
    if !v.is_finite() || !(0.0..=100.0).contains(&v) {
        return Err(PercentError { field, value: v });
    }
    Ok((v * 10_000.0).round() as u32)
}

/// A RequestMirror filter: its backend (None, and noted, when the route
/// may not reach it), and its share in millionths when the filter sets one
/// (`percent` or `fraction`).
pub(super) fn request_mirror(
    m: &HttpRouteRulesFiltersRequestMirror,
    scope: Scope<'_>,
    notes: &mut Vec<String>,
) -> Result<(Option<pb::WeightedBackend>, Option<u32>), RouteError> {
    let b = &m.backend_ref;
    let (service, port) = service_ref(
        b.group.as_deref(),
        b.kind.as_deref(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        scope.referrer.namespace,
        scope.domain_suffix,
    )
    .map_err(RouteError::MirrorBackend)?;
    let share = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(RouteError::MirrorPercentAndFraction);
        }
        (Some(p), None) => Some(percent_per_million("RequestMirror percent", p as f64)?),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            if d <= 0 || f.numerator < 0 || f.numerator > d {
                return Err(RouteError::MirrorFraction {
                    numerator: f.numerator,
                    denominator: d,
                });
            }
            Some((f.numerator as u64 * ALL as u64 / d as u64) as u32)
        }
        (None, None) => None,
    };
    let backend = permitted(
        scope,
        b.namespace.as_deref(),
        &b.name,
        "mirror backend",
        notes,
    )
    .then(|| pb::WeightedBackend {
        service,
        port,
        weight: 1,
        ..Default::default()
    });
    Ok((backend, share))
}
