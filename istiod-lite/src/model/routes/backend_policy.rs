//! DestinationRules: which service one names and its traffic policy as
//! the waypoint's backend policy.

use mesh_proto::mesh::waypoint as pb;

use super::durations::parse_istio_duration;
use super::errors::WildcardHost;
use crate::config::crds::DestinationRule;

/// Which service a DestinationRule `host` names: a short name is relative
/// to the rule's namespace. Wildcard hosts are not supported (reported).
pub fn destination_host(
    host: &str,
    dr_ns: &str,
    domain_suffix: &str,
) -> Result<String, WildcardHost> {
    if host.contains('*') {
        return Err(WildcardHost(host.to_string()));
    }
    Ok(if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{dr_ns}.svc.{domain_suffix}")
    })
}

/// A DestinationRule's traffic policy as the waypoint's backend policy,
/// with a reason for each field it could not take (that field is left at
/// the waypoint's default; the others still apply).
pub fn backend_policy(dr: &DestinationRule) -> (pb::BackendPolicy, Vec<String>) {
    let mut out = pb::BackendPolicy::default();
    let mut issues = Vec::new();
    let Some(tp) = &dr.spec.traffic_policy else {
        return (out, issues);
    };
    let mut ms = |field: &str, v: &Option<String>| -> u32 {
        match v.as_deref().map(parse_istio_duration) {
            None => 0,
            Some(Ok(ms)) => ms as u32,
            Some(Err(e)) => {
                issues.push(format!("{field}: {e}"));
                0
            }
        }
    };
    if let Some(cp) = &tp.connection_pool {
        if let Some(tcp) = &cp.tcp {
            out.max_connections = tcp.max_connections.unwrap_or(0);
            out.connect_timeout_ms = ms("connectionPool.tcp.connectTimeout", &tcp.connect_timeout);
        }
        if let Some(h) = &cp.http {
            out.max_pending_requests = h.http1_max_pending_requests.unwrap_or(0);
            out.max_requests = h.http2_max_requests.unwrap_or(0);
            out.max_requests_per_connection = h.max_requests_per_connection.unwrap_or(0);
            out.max_retries = h.max_retries.unwrap_or(0);
            out.idle_timeout_ms = ms("connectionPool.http.idleTimeout", &h.idle_timeout);
        }
    }
    if let Some(od) = &tp.outlier_detection {
        // Istio's defaults where the rule leaves a field out.
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        out.outlier_detection = Some(pb::OutlierDetection {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            interval_ms: or(ms("outlierDetection.interval", &od.interval), 10_000),
            base_ejection_ms: or(
                ms("outlierDetection.baseEjectionTime", &od.base_ejection_time),
                30_000,
            ),
            max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
        });
    }
    if let Some(simple) = tp.load_balancer.as_ref().and_then(|l| l.simple.as_deref()) {
        out.load_balancer = match simple {
            "LEAST_REQUEST" | "UNSPECIFIED" => pb::LoadBalancer::LeastRequest,
            "ROUND_ROBIN" => pb::LoadBalancer::RoundRobin,
            "RANDOM" => pb::LoadBalancer::Random,
            other => {
                issues.push(format!(
                    "loadBalancer.simple {other:?} is not supported (LEAST_REQUEST, ROUND_ROBIN, RANDOM); using LEAST_REQUEST"
                ));
                pb::LoadBalancer::LeastRequest
            }
        } as i32;
    }
    (out, issues)
}
