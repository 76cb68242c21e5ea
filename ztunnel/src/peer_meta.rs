//! Telemetry a tunnel's two ends tell each other, in the formats Istio's
//! ztunnel speaks: the source's (and, on the 200, the destination's)
//! workload as W3C `baggage`, and the original client and intended service
//! as `forwarded: for="ip:port";host=<service hostname>`.
//!
//! Baggage keys: `k8s.cluster.name`, `k8s.namespace.name`,
//! `k8s.<kind>.name` (kind: deployment, cronjob, pod, job),
//! `service.name` (canonical service), `service.version` (canonical
//! revision). One header or several, comma-separated; an empty value is no
//! value.

use http::HeaderMap;

use mesh_core::identity::Identity;
use mesh_core::state::{TunnelProtocol, Workload, WorkloadKind};

/// A workload as its baggage describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster_id: Option<String>,
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    pub workload_kind: Option<WorkloadKind>,
    pub service_name: Option<String>,
    pub revision: Option<String>,
}

/// The baggage describing `w`.
pub fn baggage(w: &Workload) -> String {
    let name = if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    };
    let canonical = if w.canonical_name.is_empty() {
        name
    } else {
        &w.canonical_name
    };
    let revision = if w.canonical_revision.is_empty() {
        "latest"
    } else {
        &w.canonical_revision
    };
    let mut parts = Vec::with_capacity(5);
    if !w.cluster_id.is_empty() {
        parts.push(format!("k8s.cluster.name={}", w.cluster_id));
    }
    parts.push(format!("k8s.namespace.name={}", w.namespace));
    parts.push(format!("k8s.{}.name={name}", w.workload_type.as_str()));
    parts.push(format!("service.name={canonical}"));
    parts.push(format!("service.version={revision}"));
    parts.join(",")
}

impl Baggage {
    /// Reads every `baggage` header; unknown keys and malformed members
    /// are skipped, a header that is not text is ignored.
    pub fn parse(headers: &HeaderMap) -> Baggage {
        let mut b = Baggage::default();
        for v in headers.get_all(mesh_core::hbone::BAGGAGE) {
            let Ok(v) = v.to_str() else { continue };
            for member in v.split(',') {
                // Properties (`;...`) are not ours to read.
                let member = member.split(';').next().unwrap_or_default();
                let Some((k, val)) = member.split_once('=') else {
                    continue;
                };
                let val = val.trim();
                let val = (!val.is_empty()).then(|| val.to_string());
                match k.trim() {
                    "k8s.cluster.name" => b.cluster_id = val,
                    "k8s.namespace.name" => b.namespace = val,
                    "service.name" => b.service_name = val,
                    "service.version" => b.revision = val,
                    k => {
                        if let Some(kind) = k
                            .strip_prefix("k8s.")
                            .and_then(|k| k.strip_suffix(".name"))
                            .and_then(WorkloadKind::parse)
                        {
                            b.workload_kind = Some(kind);
                            b.workload_name = val;
                        }
                    }
                }
            }
        }
        b
    }

    pub fn is_empty(&self) -> bool {
        *self == Baggage::default()
    }

    /// A stand-in workload for the metric labels of a peer the local state
    /// does not know, named as its baggage names it. Its identity is the
    /// one it proved (never taken from the baggage).
    pub fn as_workload(&self, identity: &Identity) -> Workload {
        let name = self.workload_name.clone().unwrap_or_default();
        Workload {
            uid: String::new(),
            name: name.clone(),
            namespace: self
                .namespace
                .clone()
                .unwrap_or_else(|| identity.namespace().to_string()),
            addresses: Vec::new(),
            network: String::new(),
            protocol: TunnelProtocol::Hbone,
            identity: identity.clone(),
            waypoint: None,
            node: String::new(),
            canonical_name: self.service_name.clone().unwrap_or_default(),
            canonical_revision: self.revision.clone().unwrap_or_default(),
            workload_name: name,
            services: Default::default(),
            authorization_policies: Vec::new(),
            healthy: true,
            native_tunnel: false,
            cluster_id: self.cluster_id.clone().unwrap_or_default(),
            workload_type: self.workload_kind.unwrap_or_default(),
        }
    }
}

/// The `host` parameter of a `forwarded` value (its first element), when
/// it is a plausible host name.
pub fn forwarded_host(v: &str) -> Option<String> {
    let first = v.split(',').next()?;
    first.split(';').find_map(|p| {
        let (k, val) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("host") {
            return None;
        }
        let val = val.trim().trim_matches('"');
        let ok = !val.is_empty()
            && val.len() <= 253
            && val
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'));
        ok.then(|| val.to_ascii_lowercase())
    })
}

/// The service a `forwarded` value's `host=` names, as metric labels
/// (hostname, namespace, name): only one that `dst` backs, so a peer can
/// name the service it asked for but never attribute traffic to a service
/// the destination is not part of.
pub fn service_of(dst: &Workload, forwarded: Option<&str>) -> Option<(String, String, String)> {
    let host = forwarded_host(forwarded?)?;
    let key = dst
        .services
        .keys()
        .find(|k| k.split_once('/').is_some_and(|(_, h)| h == host))?;
    let (ns, hostname) = key.split_once('/')?;
    let name = hostname.split('.').next().unwrap_or(hostname);
    Some((hostname.to_string(), ns.to_string(), name.to_string()))
}

/// The source workload for an inbound connection's labels: the one the
/// local state knows at the peer's address (authoritative, from the
/// control plane), else the one the peer's baggage describes.
pub fn source_of(
    known: Option<std::sync::Arc<Workload>>,
    headers: &HeaderMap,
    identity: &Identity,
) -> Option<std::sync::Arc<Workload>> {
    known.or_else(|| {
        let b = Baggage::parse(headers);
        (!b.is_empty()).then(|| std::sync::Arc::new(b.as_workload(identity)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::hbone::forwarded_value as forwarded;
    use std::net::SocketAddr;

    fn wl() -> Workload {
        let mut w = Baggage::default().as_workload(
            &"spiffe://cluster.local/ns/shop/sa/client"
                .parse()
                .expect("identity"),
        );
        w.name = "client-7d9f".into();
        w.workload_name = "client".into();
        w.canonical_name = "client".into();
        w.canonical_revision = "v2".into();
        w.cluster_id = "east".into();
        w.workload_type = WorkloadKind::CronJob;
        w
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(mesh_core::hbone::BAGGAGE, v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn baggage_names_the_real_cluster_and_kind_and_reads_back() {
        let b = baggage(&wl());
        assert_eq!(
            b,
            "k8s.cluster.name=east,k8s.namespace.name=shop,k8s.cronjob.name=client,service.name=client,service.version=v2"
        );
        let parsed = Baggage::parse(&headers(&[&b]));
        assert_eq!(parsed.cluster_id.as_deref(), Some("east"));
        assert_eq!(parsed.workload_kind, Some(WorkloadKind::CronJob));
        assert_eq!(parsed.workload_name.as_deref(), Some("client"));
        assert_eq!(parsed.revision.as_deref(), Some("v2"));
        // No cluster known: no key (not a made-up one).
        let mut w = wl();
        w.cluster_id.clear();
        assert!(!baggage(&w).contains("k8s.cluster.name"));
    }

    #[test]
    fn baggage_parses_across_headers_and_skips_what_it_does_not_know() {
        let b = Baggage::parse(&headers(&[
            "k8s.cluster.name=K1, k8s.namespace.name=NS1",
            "k8s.deployment.name=N1;prop=x,service.name=,bogus,other.key=1",
        ]));
        assert_eq!(b.cluster_id.as_deref(), Some("K1"));
        assert_eq!(b.namespace.as_deref(), Some("NS1"));
        assert_eq!(b.workload_name.as_deref(), Some("N1"));
        assert_eq!(b.workload_kind, Some(WorkloadKind::Deployment));
        assert_eq!(b.service_name, None);
        assert!(Baggage::parse(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn the_inbound_side_attributes_the_service_and_an_unknown_source() {
        let mut dst = wl();
        dst.services
            .insert("shop/server.shop.svc.cluster.local".into(), Vec::new());
        let f = forwarded(
            "10.0.0.1:4000".parse().expect("addr"),
            Some("server.shop.svc.cluster.local"),
        );
        assert_eq!(
            service_of(&dst, Some(&f)),
            Some((
                "server.shop.svc.cluster.local".into(),
                "shop".into(),
                "server".into()
            ))
        );
        // A service the destination does not back is not taken.
        let other = forwarded(
            "10.0.0.1:4000".parse().expect("addr"),
            Some("admin.shop.svc.cluster.local"),
        );
        assert_eq!(service_of(&dst, Some(&other)), None);
        assert_eq!(service_of(&dst, None), None);

        let id: Identity = "spiffe://cluster.local/ns/web/sa/front"
            .parse()
            .expect("identity");
        let h = headers(&[
            "k8s.cluster.name=west,k8s.namespace.name=web,k8s.pod.name=front-1,service.name=front,service.version=v3",
        ]);
        let s = source_of(None, &h, &id).expect("from baggage");
        assert_eq!(
            (
                s.cluster_id.as_str(),
                s.canonical_name.as_str(),
                s.canonical_revision.as_str()
            ),
            ("west", "front", "v3")
        );
        assert_eq!(s.workload_type, WorkloadKind::Pod);
        assert_eq!(s.identity, id, "the proven identity, never the baggage's");
        // The local state wins over what the peer says.
        let known = std::sync::Arc::new(wl());
        let s = source_of(Some(known.clone()), &h, &id).expect("known");
        assert_eq!(s.cluster_id, "east");
        assert!(source_of(None, &HeaderMap::new(), &id).is_none());
    }

    #[test]
    fn forwarded_carries_the_service_host() {
        let c: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let v = forwarded(c, Some("server.shop.svc.cluster.local"));
        assert_eq!(
            v,
            "for=\"10.0.0.1:4000\";host=server.shop.svc.cluster.local"
        );
        assert_eq!(
            forwarded_host(&v).as_deref(),
            Some("server.shop.svc.cluster.local")
        );
        assert_eq!(forwarded_host(&forwarded(c, None)), None);
        assert_eq!(
            forwarded_host("for=x;HOST=\"A.b\", host=c").as_deref(),
            Some("a.b")
        );
        assert_eq!(forwarded_host("for=x;host=a b"), None);
    }
}
