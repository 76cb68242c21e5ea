//! What the waypoint takes from the controller: workloads and services
//! (its endpoints) into a ztunnel proxy state, and `ServiceRoutes` into the
//! route table. A resource that does not compile is rejected by name; the
//! rest of the response still applies.

use mesh_proto::envoy::service::discovery::v3::Resource;
use mesh_proto::mesh::waypoint::ServiceRoutes;
use mesh_proto::{ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use prost::Message;
use ztunnel::xds::{StateSink, XdsSink};

use crate::routes::{RouteTable, ServiceConfig};

pub const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL];

pub struct WaypointSink {
    pub state: StateSink,
    pub routes: RouteTable,
}

impl XdsSink for WaypointSink {
    fn types(&self) -> &'static [&'static str] {
        &TYPES
    }

    fn apply(
        &self,
        type_url: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Vec<(String, String)> {
        if type_url != SERVICE_ROUTES_TYPE_URL {
            return self.state.apply(type_url, resources, removed);
        }
        let mut add = Vec::with_capacity(resources.len());
        let mut rejected = Vec::new();
        for r in resources {
            let compiled = match &r.resource {
                None => Err("resource has no body".to_string()),
                Some(any) => ServiceRoutes::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|s| ServiceConfig::compile(&r.name, &s).map_err(|e| e.to_string())),
            };
            match compiled {
                Ok(c) => add.push(c),
                Err(e) => rejected.push((r.name.clone(), e)),
            }
        }
        self.routes.update(add, removed);
        rejected
    }
}
