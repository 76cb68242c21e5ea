//! What the waypoint takes from the controller: workloads and services
//! (its endpoints) into a ztunnel proxy state, and `ServiceRoutes` into the
//! route table; in the ingress role, its Gateway's `Ingress` instead of
//! routes. A resource that does not compile is rejected by name (NACK); the
//! rest of the response still applies. A rejected one never leaves stale or
//! missing policies behind: a policy that does not compile is enforced as
//! its fail-closed stand-in (`Policy::fail_closed`), routes that do not
//! compile keep their last good version beside the new policies, and a
//! resource that does not even decode denies every request for its service.

use mesh_core::xds::{StateSink, XdsSink};
use mesh_proto::envoy::service::discovery::v3::Resource;
use mesh_proto::mesh::waypoint::{Ingress, ServiceRoutes};
use mesh_proto::{ADDRESS_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;
use tracing::{info, warn};

use crate::authz::Policy;
use crate::config::Role;
use crate::ingress::{self, IngressConfig, IngressTable};
use crate::routes::{RouteTable, ServiceConfig};

pub const WAYPOINT_TYPES: [&str; 2] = [ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL];
pub const INGRESS_TYPES: [&str; 2] = [ADDRESS_TYPE_URL, INGRESS_TYPE_URL];

pub struct WaypointSink {
    pub role: Role,
    pub state: StateSink,
    pub routes: RouteTable,
    pub ingress: IngressTable,
    /// Ingress only: "namespace/name" of our Gateway, the one resource of
    /// the Ingress type we take.
    pub gateway: String,
}

impl WaypointSink {
    fn apply_routes(&self, resources: &[Resource], removed: &[String]) -> Vec<(String, String)> {
        let mut add = Vec::with_capacity(resources.len());
        let mut rejected = Vec::new();
        for r in resources {
            let (config, error) = compile_fail_closed(r, self.routes.get(&r.name).as_deref());
            if let Some(e) = error {
                warn!(resource = %r.name, error = %e, "routes refused; enforcing fail closed");
                rejected.push((r.name.clone(), e));
            }
            add.push(config);
        }
        self.routes.update(add, removed);
        rejected
    }

    fn apply_ingress(&self, resources: &[Resource], removed: &[String]) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut next: Option<(IngressConfig, Vec<ServiceConfig>)> = None;
        if removed.contains(&self.gateway) {
            next = Some((IngressConfig::default(), Vec::new()));
        }
        for r in resources {
            if r.name != self.gateway {
                rejected.push((
                    r.name.clone(),
                    format!("not this gateway's ({})", self.gateway),
                ));
                continue;
            }
            let compiled = match &r.resource {
                None => Err("resource has no body".to_string()),
                Some(any) => Ingress::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|i| ingress::compile(&i).map_err(|e| e.to_string())),
            };
            match compiled {
                Ok(c) => next = Some(c),
                Err(e) => rejected.push((r.name.clone(), e)),
            }
        }
        if let Some((cfg, backends)) = next {
            let old = self.ingress.load();
            let gone: Vec<String> = old
                .backends
                .iter()
                .filter(|k| !cfg.backends.contains(k))
                .cloned()
                .collect();
            // Backends first: a listener never routes to a service whose
            // ports and policy are not known yet.
            self.routes.update(backends, &gone);
            info!(
                gateway = %self.gateway,
                ports = ?cfg.ports.keys().collect::<Vec<_>>(),
                listeners = cfg.ports.values().map(|p| p.listeners.len()).sum::<usize>(),
                "ingress config applied"
            );
            self.ingress.store(cfg);
        }
        rejected
    }
}

/// A `ServiceRoutes` resource as the waypoint will enforce it, and why it
/// was refused if it was. `previous` is what the waypoint holds for it.
fn compile_fail_closed(
    r: &Resource,
    previous: Option<&ServiceConfig>,
) -> (ServiceConfig, Option<String>) {
    let base = |policies: Vec<Policy>| {
        let mut c = previous
            .cloned()
            .unwrap_or_else(|| ServiceConfig::default_for(&r.name));
        c.policies = policies.into();
        c
    };
    let decoded = match &r.resource {
        None => Err("resource has no body".to_string()),
        Some(any) => ServiceRoutes::decode(any.value.as_slice()).map_err(|e| e.to_string()),
    };
    let mut s = match decoded {
        Ok(s) => s,
        Err(e) => {
            // Nothing of the new version is known: deny every request.
            let deny = Policy::fail_closed(&mesh_proto::mesh::waypoint::Policy {
                name: format!("{} (unreadable)", r.name),
                action: mesh_proto::mesh::waypoint::PolicyAction::Deny as i32,
                ..Default::default()
            });
            return (base(vec![deny]), Some(e));
        }
    };
    let mut errors = Vec::new();
    let policies: Vec<Policy> = std::mem::take(&mut s.policies)
        .iter()
        .map(|p| {
            Policy::compile(p).unwrap_or_else(|e| {
                errors.push(e.to_string());
                Policy::fail_closed(p)
            })
        })
        .collect();
    let config = match ServiceConfig::compile(&r.name, &s) {
        Ok(mut c) => {
            c.policies = policies.into();
            c
        }
        Err(e) => {
            errors.push(e.to_string());
            base(policies)
        }
    };
    let error = (!errors.is_empty()).then(|| errors.join("; "));
    (config, error)
}

impl XdsSink for WaypointSink {
    fn types(&self) -> &'static [&'static str] {
        match self.role {
            Role::Waypoint => &WAYPOINT_TYPES,
            Role::Ingress => &INGRESS_TYPES,
        }
    }

    fn apply(
        &self,
        type_url: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Vec<(String, String)> {
        match type_url {
            SERVICE_ROUTES_TYPE_URL => self.apply_routes(resources, removed),
            INGRESS_TYPE_URL => self.apply_ingress(resources, removed),
            _ => self.state.apply(type_url, resources, removed),
        }
    }
}
