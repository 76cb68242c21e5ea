//! Input changes: each kind's change is kept and marks the outputs it
//! can affect ([`Dirty`]) for [`Model::recompute`].

use super::pod::PodView;
use super::{
    Dirty, GATEWAY_NAME_LABEL, Model, NsName, extauthz, in_ns, ns_name, routes, tls_secret,
};
use crate::config::objects::{Change, Kind, Object};

impl Model {
    pub(super) fn mark_ns(&self, ns: &str, d: &mut Dirty) {
        d.pods.extend(in_ns(&self.pods, ns));
        d.services.extend(in_ns(&self.services, ns));
    }

    pub(super) fn apply_one(&mut self, c: Change, d: &mut Dirty) {
        let (key, obj) = match c {
            Change::Upsert(o) => (o.key(), Some(o)),
            Change::Delete(k) => (k, None),
        };
        let nn = ns_name(&key);
        match key.kind {
            Kind::Namespace => {
                match obj {
                    Some(Object::Namespace(n)) => self.namespaces.insert(key.name.clone(), *n),
                    _ => self.namespaces.remove(&key.name),
                };
                self.mark_ns(&key.name, d);
                d.policies.extend(in_ns(&self.authz_policies, &key.name));
                d.peer_auths = true;
                d.waypoints = true;
                // Namespace labels decide which routes an ingress admits.
                d.ingresses = true;
            }
            Kind::Pod => self.apply_pod(nn, obj, d),
            Kind::Service => {
                match obj {
                    Some(Object::Service(s)) => self.services.insert(nn.clone(), *s),
                    _ => self.services.remove(&nn),
                };
                d.services.insert(nn.clone());
                d.pods.extend(in_ns(&self.pods, &nn.0));
                extauthz::mark_provider_service(self, &nn, d);
                // A waypoint's Service (named as its Gateway) carries the
                // address every service using that waypoint publishes.
                if self.gateways.contains_key(&nn) {
                    d.services.extend(in_ns(&self.services, &nn.0));
                    d.waypoints = true;
                }
                d.ingresses = true;
            }
            Kind::EndpointSlice => {
                match obj {
                    Some(Object::EndpointSlice(s)) => self.slices.insert(nn.clone(), *s),
                    _ => self.slices.remove(&nn),
                };
                d.pods.extend(in_ns(&self.pods, &nn.0));
            }
            Kind::Gateway => {
                match obj {
                    Some(Object::Gateway(g)) => self.gateways.insert(nn.clone(), *g),
                    _ => self.gateways.remove(&nn),
                };
                self.mark_ns(&nn.0, d);
                d.gateway_proxies = true;
                d.ingresses = true;
                d.waypoints = true;
            }
            Kind::AuthorizationPolicy => self.apply_authz_policy(nn, obj, d),
            Kind::PeerAuthentication => {
                match obj {
                    Some(Object::PeerAuthentication(p)) => self.peer_auths.insert(nn.clone(), *p),
                    _ => self.peer_auths.remove(&nn),
                };
                d.peer_auths = true;
                d.pods.extend(in_ns(&self.pods, &nn.0));
            }
            Kind::HttpRoute => {
                let old = match obj {
                    Some(Object::HttpRoute(r)) => {
                        d.routes.extend(routes::service_parents(&r));
                        self.http_routes.insert(nn.clone(), *r)
                    }
                    _ => self.http_routes.remove(&nn),
                };
                d.routes
                    .extend(old.iter().flat_map(routes::service_parents));
                d.http_routes.insert(nn.clone());
                d.ingresses = true;
            }
            Kind::DestinationRule => {
                match obj {
                    Some(Object::DestinationRule(r)) => self.dest_rules.insert(nn.clone(), *r),
                    _ => self.dest_rules.remove(&nn),
                };
                // A rule in the root namespace can apply to any service.
                if nn.0 == self.cfg.root_namespace {
                    d.routes.extend(self.services.keys().cloned());
                } else {
                    d.routes.extend(in_ns(&self.services, &nn.0));
                }
                d.dest_rules.insert(nn.clone());
                d.ingresses = true;
            }
            Kind::TrafficPolicy => self.apply_traffic_policy(nn, obj, d),
            Kind::ReferenceGrant => self.apply_reference_grant(nn, obj, d),
            Kind::Secret => {
                // Only the verdict and what a listener serves are kept.
                match obj {
                    Some(Object::Secret(s)) => {
                        self.secrets.insert(nn.clone(), tls_secret::tls_secret(&s))
                    }
                    _ => self.secrets.remove(&nn),
                };
                d.ingresses = true;
            }
            Kind::ServiceAccount | Kind::Node | Kind::GatewayClass => {
                match obj {
                    Some(o) => self.others.insert(key, o),
                    None => self.others.remove(&key),
                };
            }
        }
    }

    /// A Pod: its workload, and the node index the CA checks.
    fn apply_pod(&mut self, nn: NsName, obj: Option<Object>, d: &mut Dirty) {
        let is_gateway = |p: &PodView| p.label(GATEWAY_NAME_LABEL).is_some();
        let view = match &obj {
            Some(Object::Pod(p)) => Some(PodView::of(p)),
            _ => None,
        };
        d.gateway_proxies |=
            self.pods.get(&nn).is_some_and(is_gateway) || view.as_ref().is_some_and(is_gateway);
        if let Some(old) = self.pods.get(&nn)
            && let Some(node) = &old.node
            && let Some(set) = self.pods_by_node.get_mut(node)
        {
            set.remove(&nn);
        }
        match view {
            Some(p) => {
                if let Some(node) = &p.node {
                    self.pods_by_node
                        .entry(node.clone())
                        .or_default()
                        .insert(nn.clone());
                }
                self.pods.insert(nn.clone(), p);
            }
            _ => {
                self.pods.remove(&nn);
            }
        }
        d.pods.insert(nn);
    }

    /// An AuthorizationPolicy: its own output, the waypoint routes that list it
    /// and the workloads it selects.
    fn apply_authz_policy(&mut self, nn: NsName, obj: Option<Object>, d: &mut Dirty) {
        let old = match obj {
            Some(Object::AuthorizationPolicy(p)) => self.authz_policies.insert(nn.clone(), *p),
            _ => self.authz_policies.remove(&nn),
        };
        d.policies.insert(nn.clone());
        d.waypoints = true;
        // A policy with targets (before or after) is in the waypoint
        // routes of its namespace's services (every service's, from
        // the root namespace).
        if old
            .iter()
            .chain(self.authz_policies.get(&nn))
            .any(|p| p.spec.has_targets())
        {
            if nn.0 == self.cfg.root_namespace {
                d.routes.extend(self.services.keys().cloned());
            } else {
                d.routes.extend(in_ns(&self.services, &nn.0));
            }
        }
        // Selector policies are listed on the workloads they select;
        // in the root namespace they select across the mesh.
        if nn.0 == self.cfg.root_namespace {
            d.pods.extend(self.pods.keys().cloned());
        } else {
            d.pods.extend(in_ns(&self.pods, &nn.0));
        }
    }

    /// A ReferenceGrant: every route that refers into its namespace (what
    /// it may reach there may have changed), their issues, and the
    /// ingresses. Route status is computed from the model when written.
    fn apply_reference_grant(&mut self, nn: NsName, obj: Option<Object>, d: &mut Dirty) {
        match obj {
            Some(Object::ReferenceGrant(g)) => self.reference_grants.insert(nn.clone(), *g),
            _ => self.reference_grants.remove(&nn),
        };
        for (rk, r) in &self.http_routes {
            if routes::refers_into(r, &nn.0) {
                d.routes.extend(routes::service_parents(r));
                d.http_routes.insert(rk.clone());
            }
        }
        d.ingresses = true;
    }

    /// A TrafficPolicy: the routes that reference it (or all its namespace's,
    /// for the namespace default).
    fn apply_traffic_policy(&mut self, nn: NsName, obj: Option<Object>, d: &mut Dirty) {
        match obj {
            Some(Object::TrafficPolicy(t)) => self.traffic_policies.insert(nn.clone(), *t),
            _ => self.traffic_policies.remove(&nn),
        };
        // The routes whose rules reference it, and their issues.
        for (rk, r) in self
            .http_routes
            .range((nn.0.clone(), String::new())..)
            .take_while(|((n, _), _)| *n == nn.0)
        {
            if routes::extension_refs(r).any(|name| name == nn.1) {
                d.routes.extend(routes::service_parents(r));
                d.http_routes.insert(rk.clone());
            }
        }
        // The namespace default applies to all its services.
        if nn.1 == routes::DEFAULT_TRAFFIC_POLICY {
            d.routes.extend(in_ns(&self.services, &nn.0));
        }
        d.traffic_policies.insert(nn.clone());
        d.ingresses = true;
    }
}
