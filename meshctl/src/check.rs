//! `meshctl check`: every proxy ready, every certificate valid and not about
//! to expire, every proxy's config acknowledged; each failure with the fix
//! to try.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::output::Table;
use crate::source::{Endpoint, Mesh};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub check: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
    pub fix: String,
}

impl Finding {
    fn ok(check: &str, target: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            target: target.into(),
            ok: true,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn fail(
        check: &str,
        target: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            target: target.into(),
            ok: false,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

pub fn table(findings: &[Finding]) -> Table {
    let failed = findings.iter().filter(|f| !f.ok).count();
    let mut t = Table::new("checks", &["CHECK", "TARGET", "RESULT", "DETAIL", "FIX"]).noted(
        if failed == 0 {
            format!("all {} checks passed", findings.len())
        } else {
            format!("{failed} of {} checks failed", findings.len())
        },
    );
    for f in findings {
        t.push_item(
            vec![
                f.check.clone(),
                f.target.clone(),
                if f.ok { "ok" } else { "FAIL" }.into(),
                f.detail.clone(),
                if f.fix.is_empty() {
                    "-".into()
                } else {
                    f.fix.clone()
                },
            ],
            serde_json::to_value(f).unwrap_or_default(),
        );
    }
    t
}

async fn readiness(findings: &mut Vec<Finding>, what: &str, ready: Option<&Endpoint>) {
    let Some(ep) = ready else { return };
    match ep.get_any("/healthz/ready").await {
        Ok((200, _)) => findings.push(Finding::ok("ready", what, "ready")),
        Ok((_, body)) => findings.push(Finding::fail(
            "ready",
            what,
            body.trim(),
            "its readiness names what is missing; its log says why (certificates: is the CA reachable? config: is the controller?)",
        )),
        Err(e) => findings.push(Finding::fail(
            "ready",
            what,
            e.to_string().lines().next().unwrap_or_default().to_string(),
            format!("is it running? it serves readiness on {}", ep.addr),
        )),
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
}

/// Certificates of one proxy's dump: available, and not expiring within
/// `warn`.
pub fn certificates(
    findings: &mut Vec<Finding>,
    who: &str,
    dump: &Value,
    warn: Duration,
    now: SystemTime,
) {
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    for c in certs {
        let id = c["identity"].as_str().unwrap_or("?").to_string();
        let target = format!("{who}: {id}");
        if c["state"] != "available" {
            findings.push(Finding::fail(
                "certificate",
                target,
                format!(
                    "{} ({})",
                    c["state"].as_str().unwrap_or("?"),
                    c["last_error"].as_str().unwrap_or("no error yet")
                ),
                "the CA refused or is unreachable: check istiod-lite's log and that the workload's pod is on this node",
            ));
            continue;
        }
        match c["not_after"].as_str().and_then(parse_time) {
            Some(t) if t <= now + warn => findings.push(Finding::fail(
                "certificate",
                target,
                format!("expires {}", c["not_after"].as_str().unwrap_or("?")),
                "renewal is failing (renewal starts at half-life): check the CA is reachable from the node",
            )),
            Some(_) => findings.push(Finding::ok(
                "certificate",
                target,
                format!("valid until {}", c["not_after"].as_str().unwrap_or("?")),
            )),
            None => findings.push(Finding::fail(
                "certificate",
                target,
                "no expiry in the dump",
                "upgrade meshctl to the proxy's version",
            )),
        }
    }
}

/// Config acknowledgement, from the controller's `/debug/connections`.
pub fn acknowledged(findings: &mut Vec<Finding>, conns: &Value) {
    for c in conns["connections"].as_array().into_iter().flatten() {
        let who = format!(
            "{} (node {})",
            c["proxy_id"].as_str().unwrap_or("?"),
            c["node"].as_str().unwrap_or("?")
        );
        for (t, v) in c["types"].as_object().into_iter().flatten() {
            let short = t.rsplit('.').next().unwrap_or(t);
            let sent = v["last_sent_nonce"].as_str();
            let acked = v["last_acked_nonce"].as_str();
            let nacked = v["last_nack"]["nonce"].as_str();
            if nacked.is_some() && nacked == sent {
                findings.push(Finding::fail(
                    "config",
                    format!("{who}: {short}"),
                    format!(
                        "rejected (NACK): {}",
                        v["last_nack"]["error"].as_str().unwrap_or("?")
                    ),
                    "fix the object the error names (istiod-lite /debug/config lists config problems); the proxy keeps its last good config meanwhile",
                ));
            } else if sent.is_some() && sent != acked {
                findings.push(Finding::fail(
                    "config",
                    format!("{who}: {short}"),
                    format!("last push {} not acknowledged yet", sent.unwrap_or("-")),
                    "run again in a few seconds; if it stays, the proxy is stuck: check its log",
                ));
            } else {
                findings.push(Finding::ok(
                    "config",
                    format!("{who}: {short}"),
                    format!("{} resources, acknowledged", v["resources"]),
                ));
            }
        }
    }
}

/// The controller's config sources, from its `/debug/config`: one finding
/// per watched kind that is not listed (a CRD not installed, RBAC refusing,
/// the API server failing), with the controller's fix; one for all when
/// every kind is listed. Nothing for a controller that watches no API.
pub fn sources(findings: &mut Vec<Finding>, config: &Value) {
    let Some(kinds) = config["sources"].as_object().filter(|k| !k.is_empty()) else {
        return;
    };
    let mut listed = 0;
    for (kind, s) in kinds {
        let state = s["state"].as_str().unwrap_or("?");
        if state == "listed" {
            listed += 1;
            continue;
        }
        let what = match state {
            "missing" => "not served by the API server (CRD not installed?)",
            "forbidden" => "refused by RBAC",
            "failing" => "the API server fails",
            "listing" => "not listed yet",
            _ => state,
        };
        let held_back =
            s["narrows_access"] == true && s["listed_once"] != true && state != "missing";
        let mut detail = match s["detail"].as_str() {
            Some(d) => format!("{what}: {d}"),
            None => what.to_string(),
        };
        detail.push_str(if held_back {
            "; the mesh is not served until it can be read"
        } else {
            "; the rest of the mesh is served without it"
        });
        findings.push(Finding::fail(
            "source",
            format!("istiod-lite: {kind}"),
            detail,
            s["fix"].as_str().unwrap_or("see istiod-lite's log"),
        ));
    }
    if listed == kinds.len() {
        findings.push(Finding::ok(
            "source",
            "istiod-lite",
            format!("all {listed} kinds listed and watched"),
        ));
    }
}

/// Runs every check the mesh's sources allow.
pub async fn run(mesh: &Mesh, warn: Duration) -> Vec<Finding> {
    let mut findings = Vec::new();
    let now = SystemTime::now();
    if let Some(dump) = &mesh.file {
        certificates(&mut findings, "dump", dump, warn, now);
        return findings;
    }
    for z in &mesh.ztunnels {
        let who = if z.node.is_empty() {
            "ztunnel".to_string()
        } else {
            format!("ztunnel on {}", z.node)
        };
        readiness(&mut findings, &who, z.readiness.as_ref()).await;
        match z.admin.get_json("/config_dump").await {
            Ok(d) => certificates(&mut findings, &who, &d, warn, now),
            Err(e) => findings.push(Finding::fail(
                "reachable",
                who.clone(),
                e.to_string().lines().next().unwrap_or_default().to_string(),
                format!(
                    "is the ztunnel running? its admin listens on {}",
                    z.admin.addr
                ),
            )),
        }
    }
    for w in &mesh.waypoints {
        let who = format!("waypoint {}", w.name);
        readiness(&mut findings, &who, w.readiness.as_ref()).await;
        match w.admin.get_json("/config_dump").await {
            Ok(d) => certificates(&mut findings, &who, &d, warn, now),
            Err(e) => findings.push(Finding::fail(
                "reachable",
                who.clone(),
                e.to_string().lines().next().unwrap_or_default().to_string(),
                format!(
                    "is the waypoint running? its admin listens on {}",
                    w.admin.addr
                ),
            )),
        }
    }
    if let Some(ctl) = &mesh.controller {
        match ctl.get_json("/debug/connections").await {
            Ok(c) => {
                acknowledged(&mut findings, &c);
                let connected: Vec<&str> = c["connections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["node"].as_str())
                    .collect();
                for z in &mesh.ztunnels {
                    if !z.node.is_empty() && !connected.contains(&z.node.as_str()) {
                        findings.push(Finding::fail(
                            "config",
                            format!("ztunnel on {}", z.node),
                            "no xDS connection to the controller",
                            "check the ztunnel's xds_address and token, and that istiod-lite is reachable from the node",
                        ));
                    }
                }
            }
            Err(e) => findings.push(Finding::fail(
                "reachable",
                "istiod-lite",
                e.to_string().lines().next().unwrap_or_default().to_string(),
                format!("is istiod-lite running? its debug endpoint is {}", ctl.addr),
            )),
        }
        if let Ok(c) = ctl.get_json("/debug/config").await {
            sources(&mut findings, &c);
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_and_refused_certificates_fail_with_a_fix() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let dump = serde_json::json!({"certificates": [
            {"identity": "spiffe://cluster.local/ns/a/sa/ok", "state": "available", "not_after": "2027-01-15T08:00:00Z"},
            {"identity": "spiffe://cluster.local/ns/a/sa/soon", "state": "available", "not_after": "2027-01-15T06:30:00Z"},
            {"identity": "spiffe://cluster.local/ns/a/sa/no", "state": "unavailable", "last_error": "CA refused"},
        ]});
        // 1_800_000_000 is 2027-01-15T08:00:00Z.
        let mut f = Vec::new();
        certificates(
            &mut f,
            "n1",
            &dump,
            Duration::from_secs(3600),
            now - Duration::from_secs(7200),
        );
        assert!(f[0].ok && !f[1].ok && !f[2].ok, "{f:?}");
        assert!(f[2].detail.contains("CA refused"));
        assert!(!f[1].fix.is_empty());
    }

    #[test]
    fn a_kind_the_controller_cannot_watch_fails_with_its_fix() {
        let config = serde_json::json!({"sources": {
            "Pod": {"state": "listed", "listed_once": true, "narrows_access": false},
            "Gateway": {"state": "missing", "detail": "404 page not found", "fix": "install the Gateway API CRDs",
                        "listed_once": false, "narrows_access": false},
            "AuthorizationPolicy": {"state": "forbidden", "detail": "403", "fix": "grant list",
                        "listed_once": false, "narrows_access": true},
        }});
        let mut f = Vec::new();
        sources(&mut f, &config);
        assert_eq!(f.len(), 2, "{f:?}");
        let gw = f
            .iter()
            .find(|x| x.target.ends_with("Gateway"))
            .expect("Gateway");
        assert!(!gw.ok && gw.detail.contains("404") && gw.detail.contains("served without it"));
        assert_eq!(gw.fix, "install the Gateway API CRDs");
        let ap = f
            .iter()
            .find(|x| x.target.ends_with("AuthorizationPolicy"))
            .expect("policy");
        assert!(ap.detail.contains("not served until"), "{ap:?}");
        // All listed: one line says so; a folder controller: nothing.
        let mut f = Vec::new();
        sources(
            &mut f,
            &serde_json::json!({"sources": {"Pod": {"state": "listed"}}}),
        );
        assert!(f.len() == 1 && f[0].ok, "{f:?}");
        let mut f = Vec::new();
        sources(&mut f, &serde_json::json!({"issues": []}));
        assert!(f.is_empty());
    }

    #[test]
    fn a_nack_is_named_with_its_error() {
        let conns = serde_json::json!({"connections": [{"proxy_id": "ztunnel~node-1", "node": "node-1", "types": {
            "type.googleapis.com/istio.workload.Address": {"resources": 4, "last_sent_nonce": "1-2", "last_acked_nonce": "1-2"},
            "type.googleapis.com/istio.security.Authorization": {"resources": 1, "last_sent_nonce": "1-3", "last_acked_nonce": "1-1",
                "last_nack": {"nonce": "1-3", "error": "shop/p: bad CIDR"}}
        }}]});
        let mut f = Vec::new();
        acknowledged(&mut f, &conns);
        assert_eq!(f.len(), 2);
        let by = |t: &str| f.iter().find(|x| x.target.ends_with(t)).expect("finding");
        assert!(by("Address").ok);
        let authz = by("Authorization");
        assert!(!authz.ok && authz.detail.contains("bad CIDR"), "{f:?}");
    }
}
