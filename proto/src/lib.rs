//! Generated wire types. Package paths mirror the protobuf packages, so
//! `istio.workload.Workload` is `mesh_proto::istio::workload::Workload`.

#![allow(clippy::all, missing_docs)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
        pub mod zds {
            tonic::include_proto!("istio.workload.zds");
        }
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        /// External authorization (`ext_authz`): what a waypoint asks a
        /// CUSTOM policy's provider.
        pub mod auth {
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// Our own resource types.
pub mod mesh {
    pub mod waypoint {
        tonic::include_proto!("mesh.waypoint");
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// xDS type URL of `istio.workload.Address` resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// xDS type URL of `mesh.waypoint.ServiceRoutes`: waypoint L7 config.
pub const SERVICE_ROUTES_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.ServiceRoutes";
/// xDS type URL of `mesh.waypoint.Ingress`: one ingress gateway's listeners.
pub const INGRESS_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.Ingress";
/// Name prefix of the `ServiceRoutes` resource a waypoint gets for its own
/// Gateway (`gateway:<namespace>/<name>`): the policies attached to the
/// Gateway, which apply to everything it serves, pod-addressed traffic
/// included.
pub const WAYPOINT_GATEWAY_PREFIX: &str = "gateway:";
/// Metadata key in a CSR request naming the identity a node proxy asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
