//! Outputs: the marked ones are recomputed, each kept by the input that
//! produced it, and the [`Delta`] names those whose content changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use gateway_api::apis::experimental::httproutes::HttpRoute;
use mesh_proto::istio::security::Authorization;
use mesh_proto::istio::workload::Address;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;

use super::resource::version_of;
use super::{
    Delta, Dirty, Model, ModelIssue, NsName, Source, XdsResource, authz, routes, waypoint, workload,
};
use crate::config::crds::DestinationRule;

impl Model {
    pub(super) fn set_output(
        &mut self,
        type_url: &'static str,
        source: Source,
        out: Option<(String, Vec<u8>)>,
        delta: &mut Delta,
    ) {
        let generation = self.generation;
        let old_name = self.produced.remove(&source);
        if let Some(old) = &old_name
            && out.as_ref().is_none_or(|(n, _)| **n != **old)
            && self
                .outputs
                .entry(type_url)
                .or_default()
                .remove(old)
                .is_some()
        {
            self.removed
                .entry(type_url)
                .or_default()
                .insert(old.clone(), generation);
            delta
                .removed
                .entry(type_url)
                .or_default()
                .insert(old.to_string());
        }
        let Some((name, bytes)) = out else {
            return;
        };
        let outputs = self.outputs.entry(type_url).or_default();
        // One shared name for the index, the input's record and the resource.
        let shared: Arc<str> = match outputs.get_key_value(name.as_str()) {
            Some((k, _)) => k.clone(),
            None => match old_name {
                Some(o) if *o == *name => o,
                _ => Arc::from(name.as_str()),
            },
        };
        self.produced.insert(source, shared.clone());
        if outputs
            .get(name.as_str())
            .is_some_and(|r| r.version == version_of(&bytes))
        {
            return;
        }
        outputs.insert(
            shared.clone(),
            Arc::new(XdsResource::new(type_url, shared, &bytes, generation)),
        );
        if let Some(r) = self.removed.get_mut(type_url) {
            r.remove(name.as_str());
        }
        if let Some(r) = delta.removed.get_mut(type_url) {
            r.remove(&name);
        }
        delta.changed.entry(type_url).or_default().insert(name);
    }

    pub(super) fn note(&mut self, object: String, reasons: Vec<String>) {
        if reasons.is_empty() {
            self.issues.remove(&object);
        } else {
            for r in &reasons {
                tracing::warn!(%object, reason = %r, "config");
            }
            let issues = reasons
                .into_iter()
                .map(|reason| ModelIssue {
                    object: object.clone(),
                    reason,
                })
                .collect();
            self.issues.insert(object, issues);
        }
    }

    pub(super) fn recompute(&mut self, d: Dirty) -> Delta {
        let mut delta = Delta {
            generation: self.generation,
            gateway_proxies: d.gateway_proxies,
            ..Delta::default()
        };
        for key in d.pods {
            let out = workload::workload(self, &key).map(|w| {
                let name = w.uid.clone();
                let addr = Address {
                    r#type: Some(mesh_proto::istio::workload::address::Type::Workload(w)),
                };
                (name, addr.encode_to_vec())
            });
            self.set_output(ADDRESS_TYPE_URL, Source::Pod(key), out, &mut delta);
        }
        for key in d.services.iter().cloned() {
            let out = workload::service(self, &key).map(|s| {
                let name = format!("{}/{}", s.namespace, s.hostname);
                let addr = Address {
                    r#type: Some(mesh_proto::istio::workload::address::Type::Service(s)),
                };
                (name, addr.encode_to_vec())
            });
            self.set_output(ADDRESS_TYPE_URL, Source::Service(key), out, &mut delta);
        }
        for key in &d.http_routes {
            let label = format!("HTTPRoute/{}/{}", key.0, key.1);
            let reasons = match self.http_routes.get(key) {
                Some(r) => {
                    routes::convert(
                        r,
                        &self.cfg.domain_suffix,
                        &self.traffic_policies,
                        &self.reference_grants,
                    )
                    .1
                }
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        for key in &d.dest_rules {
            let label = format!("DestinationRule/{}/{}", key.0, key.1);
            let reasons = match self.dest_rules.get(key) {
                Some(r) => {
                    match routes::destination_host(&r.spec.host, &key.0, &self.cfg.domain_suffix) {
                        Ok(_) => routes::backend_policy(r).1,
                        Err(e) => vec![e.to_string()],
                    }
                }
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        for key in &d.traffic_policies {
            let label = format!("TrafficPolicy/{}/{}", key.0, key.1);
            let reasons = match self.traffic_policies.get(key) {
                Some(t) => routes::route_extension(t).err().unwrap_or_default(),
                None => Vec::new(),
            };
            self.note(label, reasons);
        }
        let route_keys: BTreeSet<NsName> = d.services.iter().chain(&d.routes).cloned().collect();
        for key in route_keys {
            let name = format!("{}/{}", key.0, workload::hostname(self, &key.0, &key.1));
            let (out, gw) = match self.service_routes(&key) {
                Some((r, gw)) => (Some((name.clone(), r.encode_to_vec())), Some(gw)),
                None => (None, None),
            };
            self.set_output(
                SERVICE_ROUTES_TYPE_URL,
                Source::Routes(key),
                out,
                &mut delta,
            );
            // A service that moves to another waypoint changes for both
            // waypoints even when its routes do not.
            let old = match &gw {
                Some(gw) => self.route_waypoints.insert(name.clone(), gw.clone()),
                None => self.route_waypoints.remove(&name),
            };
            if old.is_some() && gw.is_some() && old != gw {
                delta
                    .changed
                    .entry(SERVICE_ROUTES_TYPE_URL)
                    .or_default()
                    .insert(name);
            }
        }
        if d.ingresses {
            self.recompute_ingresses(&mut delta);
        }
        if d.waypoints {
            self.recompute_waypoint_gateways(&mut delta);
        }
        for key in d.policies {
            let label = format!("AuthorizationPolicy/{}/{}", key.0, key.1);
            let (out, reasons) = match self.authz_policies.get(&key) {
                Some(p) => authz::convert(self, p),
                None => (None, Vec::new()),
            };
            self.note(label, reasons);
            let out = out.map(encode_authz);
            self.set_output(AUTHORIZATION_TYPE_URL, Source::Policy(key), out, &mut delta);
        }
        if d.peer_auths {
            let keys: Vec<NsName> = self
                .produced
                .keys()
                .filter_map(|s| match s {
                    Source::PeerAuth(k) => Some(k.clone()),
                    _ => None,
                })
                .chain(self.peer_auths.keys().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for key in keys {
                let label = format!("PeerAuthentication/{}/{}", key.0, key.1);
                let (out, reasons) = match self.peer_auths.get(&key) {
                    Some(p) => authz::peer_authentication(self, p),
                    None => (None, Vec::new()),
                };
                self.note(label, reasons);
                let out = out.map(encode_authz);
                self.set_output(
                    AUTHORIZATION_TYPE_URL,
                    Source::PeerAuth(key),
                    out,
                    &mut delta,
                );
            }
        }
        delta
    }

    /// The waypoint routes of a service, when it has a waypoint, and that
    /// waypoint's Gateway. Routes from older HTTPRoutes come first among
    /// equally specific matches.
    pub(super) fn service_routes(
        &self,
        key: &NsName,
    ) -> Option<(mesh_proto::mesh::waypoint::ServiceRoutes, NsName)> {
        let gw = workload::service_waypoint(self, key)?;
        let svc = workload::service(self, key)?;
        let mut attached: Vec<&HttpRoute> = self
            .http_routes
            .values()
            // Only producer routes (in the service's namespace): a consumer
            // route applies to its own namespace's clients, which a
            // waypoint on the server side cannot tell apart; reported below.
            .filter(|r| r.metadata.namespace.as_deref() == Some(key.0.as_str()))
            .filter(|r| routes::service_parents(r).contains(key))
            .collect();
        attached.sort_by(|a, b| {
            (
                &a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &a.metadata.name,
            )
                .cmp(&(
                    &b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    &b.metadata.name,
                ))
        });
        let mut out: Vec<_> = attached
            .into_iter()
            .flat_map(|r| {
                routes::convert(
                    r,
                    &self.cfg.domain_suffix,
                    &self.traffic_policies,
                    &self.reference_grants,
                )
                .0
            })
            .collect();
        routes::sort(&mut out);
        let backend_policy = self
            .destination_rule(&key.0, &svc.hostname)
            .map(|r| routes::backend_policy(r).0);
        let ports = self
            .services
            .get(key)
            .map(waypoint::ports)
            .unwrap_or_default();
        let policies = waypoint::policies(self, key, &gw);
        Some((
            mesh_proto::mesh::waypoint::ServiceRoutes {
                hostname: svc.hostname,
                namespace: svc.namespace,
                routes: out,
                backend_policy,
                ports,
                policies,
                default_rate_limit: routes::default_rate_limit(&key.0, &self.traffic_policies),
            },
            gw,
        ))
    }

    /// The DestinationRule for a service: the oldest in its namespace naming
    /// it, else the oldest in the root namespace (Istio's lookup order, less
    /// the client's namespace, which a server-side waypoint does not have).
    pub(super) fn destination_rule(&self, ns: &str, hostname: &str) -> Option<&DestinationRule> {
        let suffix = &self.cfg.domain_suffix;
        let pick = |rule_ns: &str| {
            self.dest_rules
                .range((rule_ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == rule_ns)
                .map(|(_, r)| r)
                .filter(|r| {
                    routes::destination_host(&r.spec.host, rule_ns, suffix).as_deref()
                        == Ok(hostname)
                })
                .min_by_key(|r| {
                    (
                        r.metadata.creation_timestamp.as_ref().map(|t| t.0),
                        r.metadata.name.clone(),
                    )
                })
        };
        pick(ns).or_else(|| pick(&self.cfg.root_namespace))
    }
}

fn encode_authz(a: Authorization) -> (String, Vec<u8>) {
    let name = format!("{}/{}", a.namespace, a.name);
    (name, a.encode_to_vec())
}
