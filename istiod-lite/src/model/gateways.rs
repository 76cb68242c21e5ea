//! The outputs made per Gateway rather than per object: each ingress
//! Gateway's `Ingress` (listeners, routes, keys) and each waypoint
//! Gateway's own `ServiceRoutes` (the policies attached to it).

use std::collections::BTreeSet;

use mesh_proto::{INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;

use super::{
    Delta, INGRESS_CLASS, Model, NsName, Source, WAYPOINT_CLASS, ingress, waypoint, workload,
};

impl Model {
    /// Every waypoint Gateway's own resource: the policies attached to the
    /// Gateway (and, from the root namespace, to every waypoint), which
    /// the waypoint applies to what it serves by pod address. Gated like a
    /// service's routes: only that Gateway's pods receive it.
    pub(super) fn recompute_waypoint_gateways(&mut self, delta: &mut Delta) {
        let keys: BTreeSet<NsName> = self
            .produced
            .keys()
            .filter_map(|s| match s {
                Source::Waypoint(k) => Some(k.clone()),
                _ => None,
            })
            .chain(
                self.gateways
                    .iter()
                    .filter(|(_, g)| g.spec.gateway_class_name == WAYPOINT_CLASS)
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        for key in keys {
            let name = format!("{}{}/{}", mesh_proto::WAYPOINT_GATEWAY_PREFIX, key.0, key.1);
            let is_waypoint = self
                .gateways
                .get(&key)
                .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS);
            let out = is_waypoint.then(|| {
                let r = mesh_proto::mesh::waypoint::ServiceRoutes {
                    hostname: workload::hostname(self, &key.0, &key.1),
                    namespace: key.0.clone(),
                    policies: waypoint::gateway_policies(self, &key),
                    ..Default::default()
                };
                (name.clone(), r.encode_to_vec())
            });
            if out.is_some() {
                self.route_waypoints.insert(name, key.clone());
            } else {
                self.route_waypoints.remove(&name);
            }
            self.set_output(SERVICE_ROUTES_TYPE_URL, Source::Waypoint(key), out, delta);
        }
    }

    /// Every ingress Gateway's resource, listener status and issues; and
    /// the removal of those of Gateways no longer ingresses.
    pub(super) fn recompute_ingresses(&mut self, delta: &mut Delta) {
        let keys: BTreeSet<NsName> = self
            .produced
            .keys()
            .filter_map(|s| match s {
                Source::Ingress(k) => Some(k.clone()),
                _ => None,
            })
            .chain(self.ingress_listeners.keys().cloned())
            .chain(
                self.gateways
                    .iter()
                    .filter(|(_, g)| g.spec.gateway_class_name == INGRESS_CLASS)
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        for key in keys {
            let label = format!("Gateway/{}/{}", key.0, key.1);
            let built = self
                .gateways
                .get(&key)
                .filter(|g| g.spec.gateway_class_name == INGRESS_CLASS)
                .map(|g| ingress::build(self, &key, g));
            let out = match built {
                Some(b) => {
                    self.note(label, b.issues);
                    self.ingress_listeners.insert(key.clone(), b.listeners);
                    Some((format!("{}/{}", key.0, key.1), b.ingress.encode_to_vec()))
                }
                None => {
                    self.note(label, Vec::new());
                    self.ingress_listeners.remove(&key);
                    None
                }
            };
            self.set_output(INGRESS_TYPE_URL, Source::Ingress(key), out, delta);
        }
    }
}
