//! Which destinations this waypoint serves, and the config each is served
//! with.
//!
//! A waypoint serves only destinations that name it:
//! - a service, when the controller sent this waypoint the service's
//!   `ServiceRoutes` (it sends them only to the waypoint the service uses);
//! - a workload addressed by its pod IP, when the workload's waypoint
//!   address is this waypoint's own Service (from this waypoint's Gateway
//!   resource, `gateway:<namespace>/<name>`).
//!
//! Anything else is refused, so a caller cannot send traffic for service B
//! through service A's waypoint (skipping B's policies, and reaching B as
//! A's waypoint). Pod-addressed traffic gets the policies attached to the
//! Gateway; service-addressed traffic gets its service's, which include the
//! Gateway's. Without the config that says what applies, nothing is served.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::state::{GatewayDestination, Snapshot, Workload};
use mesh_proto::WAYPOINT_GATEWAY_PREFIX;
use mesh_proto::mesh::waypoint as pb;

use crate::authz::Policy;
use crate::config::Config;
use crate::routes::{RouteTable, ServiceConfig, WORKLOAD_KEY};

/// Why a CONNECT target is not served here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No service or workload has this address.
    Unknown,
    /// A service this waypoint has no config for: another waypoint's, one
    /// without a waypoint, or one whose config has not arrived.
    NotOurService(String),
    /// A workload whose waypoint is not this one, or that has none.
    NotOurWorkload(String),
    /// This waypoint's own Gateway config has not arrived yet.
    NoGatewayConfig,
}

impl Refusal {
    /// The HBONE answer: 400 for an address nobody has, 401 for a
    /// destination this waypoint may not serve, 503 while its own config is
    /// missing.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unknown => StatusCode::BAD_REQUEST,
            Refusal::NotOurService(_) | Refusal::NotOurWorkload(_) => StatusCode::UNAUTHORIZED,
            Refusal::NoGatewayConfig => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unknown => write!(f, "not a service or workload address"),
            Refusal::NotOurService(k) => {
                write!(f, "service {k} does not use this waypoint")
            }
            Refusal::NotOurWorkload(uid) => {
                write!(f, "workload {uid} does not use this waypoint")
            }
            Refusal::NoGatewayConfig => {
                write!(f, "this waypoint's own config has not arrived")
            }
        }
    }
}

/// The name of this waypoint's own Gateway resource.
pub fn gateway_key(cfg: &Config) -> String {
    format!("{WAYPOINT_GATEWAY_PREFIX}{}/{}", cfg.namespace, cfg.gateway)
}

/// The destination key (a service's "namespace/hostname", or
/// `workload:<uid>`) of a CONNECT target this waypoint serves.
pub fn serves(
    snap: &Snapshot,
    routes: &RouteTable,
    cfg: &Config,
    ip: IpAddr,
) -> Result<String, Refusal> {
    if let Some(svc) = snap.service_by_vip(&cfg.network, ip) {
        let key = svc.service.key();
        return match routes.get(&key) {
            Some(_) => Ok(key),
            None => Err(Refusal::NotOurService(key)),
        };
    }
    let Some(w) = snap.workload_by_ip(&cfg.network, ip) else {
        return Err(Refusal::Unknown);
    };
    let gw = routes
        .get(&gateway_key(cfg))
        .ok_or(Refusal::NoGatewayConfig)?;
    if names(snap, &gw, w) {
        Ok(format!("{WORKLOAD_KEY}{}", w.uid))
    } else {
        Err(Refusal::NotOurWorkload(w.uid.clone()))
    }
}

/// Whether workload `w`'s waypoint address is this waypoint's own Service
/// (`gw`, this waypoint's Gateway resource).
fn names(snap: &Snapshot, gw: &ServiceConfig, w: &Workload) -> bool {
    let own_key = format!("{}/{}", gw.namespace, gw.hostname);
    match w.waypoint.as_ref().map(|g| &g.destination) {
        Some(GatewayDestination::Address { network, ip }) => {
            snap.service(&own_key).is_some_and(|own| {
                own.service
                    .vips
                    .iter()
                    .any(|(n, v)| n == network && v == ip)
            })
        }
        Some(GatewayDestination::Hostname {
            namespace,
            hostname,
        }) => *namespace == gw.namespace && *hostname == gw.hostname,
        None => false,
    }
}

/// The config a request or connection for `key` is served with, looked up
/// afresh each time (policies change under long connections). A workload
/// gets the defaults and its Gateway's policies while it still names this
/// waypoint; a destination whose config is gone meanwhile, or a workload
/// that no longer names it, gets a DENY of everything.
pub fn config(snap: &Snapshot, routes: &RouteTable, cfg: &Config, key: &str) -> Arc<ServiceConfig> {
    if let Some(uid) = key.strip_prefix(WORKLOAD_KEY) {
        let mut c = ServiceConfig::default_for(key);
        // Still ours? A workload that moved to another waypoint (or to
        // none) under a kept-alive connection is no longer served.
        c.policies = match (routes.get(&gateway_key(cfg)), snap.workload(uid)) {
            (Some(gw), Some(w)) if names(snap, &gw, w) => gw.policies.clone(),
            _ => Arc::from([deny_all(key)]),
        };
        return Arc::new(c);
    }
    routes.get(key).unwrap_or_else(|| {
        let mut c = ServiceConfig::default_for(key);
        c.policies = Arc::from([deny_all(key)]);
        Arc::new(c)
    })
}

fn deny_all(key: &str) -> Policy {
    Policy::fail_closed(&pb::Policy {
        name: format!("{key} (no config)"),
        action: pb::PolicyAction::Deny as i32,
        ..Default::default()
    })
}
