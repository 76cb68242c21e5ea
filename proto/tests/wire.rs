//! Our messages against bytes written by hand from the public schemas. Each
//! case checks both directions: our encoding equals the bytes, and the bytes
//! decode to the expected value. A wrong field number or type fails here.

use std::collections::BTreeMap;

use mesh_proto::envoy::config::core::v3::Node;
use mesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use mesh_proto::google::rpc::Status;
use mesh_proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_proto::istio::security::{
    self, Authorization, Clause, Match, Rule, ServiceAccountMatch, StringMatch, string_match,
};
use mesh_proto::istio::workload::zds::{self, WorkloadRequest, WorkloadResponse, workload_request};
use mesh_proto::istio::workload::{
    Address, GatewayAddress, NetworkAddress, Port, PortList, TunnelProtocol, Workload, address,
    gateway_address,
};
use prost::Message;
use prost_types::{Any, Struct, Value, value::Kind};

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, bytes: &[u8]) {
    assert_eq!(msg.encode_to_vec(), bytes, "encoding of {msg:?}");
    assert_eq!(&M::decode(bytes).expect("decodes"), msg);
}

#[test]
fn certificate_request_and_response() {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "ImpersonatedIdentity".to_string(),
        Value {
            kind: Some(Kind::StringValue("x".into())),
        },
    );
    let req = IstioCertificateRequest {
        csr: "ab".into(),
        validity_duration: 3600,
        metadata: Some(Struct { fields }),
    };
    let mut b = vec![0x0a, 0x02, b'a', b'b']; // csr = 1
    b.extend([0x18, 0x90, 0x1c]); // validity_duration = 3 (varint 3600)
    b.extend([0x22, 0x1d]); // metadata = 4, 29 bytes
    b.extend([0x0a, 0x1b]); // Struct.fields entry, 27 bytes
    b.extend([0x0a, 0x14]);
    b.extend(b"ImpersonatedIdentity"); // key
    b.extend([0x12, 0x03, 0x1a, 0x01, b'x']); // value: Value.string_value = 3
    check(&req, &b);

    let resp = IstioCertificateResponse {
        cert_chain: vec!["a".into(), "b".into()],
    };
    check(&resp, &[0x0a, 0x01, b'a', 0x0a, 0x01, b'b']);
}

#[test]
fn workload_address() {
    let mut services = BTreeMap::new();
    services.insert(
        "ns/h".to_string(),
        PortList {
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
            }],
        },
    );
    let w = Workload {
        uid: "u".into(),
        name: "p".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "td".into(),
        service_account: "sa".into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, 2],
            })),
            hbone_mtls_port: 15008,
        }),
        node: "n1".into(),
        services,
        ..Default::default()
    };
    // Encoders write fields in field-number order.
    let mut wb = vec![0x0a, 0x01, b'p']; // name = 1
    wb.extend([0x1a, 0x04, 10, 0, 0, 1]); // addresses = 3
    wb.extend([0x28, 0x01]); // tunnel_protocol = 5, HBONE
    wb.extend([0x32, 0x02, b't', b'd']); // trust_domain = 6
    wb.extend([0x3a, 0x02, b's', b'a']); // service_account = 7
    // waypoint = 8: GatewayAddress{ address = 2 {address = 2}, hbone_mtls_port = 3 }
    wb.extend([
        0x42, 0x0b, 0x12, 0x06, 0x12, 0x04, 10, 0, 0, 2, 0x18, 0xa0, 0x75,
    ]);
    wb.extend([0x4a, 0x02, b'n', b'1']); // node = 9
    wb.extend([0xa2, 0x01, 0x01, b'u']); // uid = 20
    // services = 22: map entry { key = 1, value = 2 PortList{ ports = 1 Port{80, 8080} } }
    wb.extend([0xb2, 0x01, 0x0f, 0x0a, 0x04, b'n', b's', b'/', b'h']);
    wb.extend([0x12, 0x07, 0x0a, 0x05, 0x08, 0x50, 0x10, 0x90, 0x3f]);
    check(&w, &wb);

    let addr = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    let mut ab = vec![0x0a, wb.len() as u8];
    ab.extend(&wb);
    check(&addr, &ab);
}

#[test]
fn authorization() {
    let a = Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact("a".into())),
                    }],
                    not_source_ips: vec![security::Address {
                        address: vec![10, 0, 0, 0],
                        length: 8,
                    }],
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    let mut b = vec![0x0a, 0x01, b'p', 0x12, 0x02, b'n', b's']; // name = 1, namespace = 2
    b.extend([0x18, 0x01, 0x20, 0x01]); // scope = 3 NAMESPACE, action = 4 DENY
    b.extend([0x2a, 0x16, 0x0a, 0x14, 0x12, 0x12]); // rules = 5 > clauses = 1 > matches = 2
    b.extend([0x1a, 0x03, 0x0a, 0x01, b'a']); // principals = 3 > exact = 1
    b.extend([0x32, 0x08, 0x0a, 0x04, 10, 0, 0, 0, 0x10, 0x08]); // not_source_ips = 6
    b.extend([0x4a, 0x01, 0x50]); // destination_ports = 9, packed
    check(&a, &b);
}

/// Istio's newer fields: `dry_run` (6) on the policy, `service_accounts`
/// (11) and `not_service_accounts` (12) on a match. A control plane's match
/// that uses only service accounts must decode as that, never as an empty
/// match.
#[test]
fn authorization_dry_run_and_service_accounts() {
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    let a = Authorization {
        name: "p".into(),
        dry_run: true,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    service_accounts: vec![sa("a", "b")],
                    not_service_accounts: vec![sa("c", "d")],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let mut b = vec![0x0a, 0x01, b'p']; // name = 1
    b.extend([0x2a, 0x14, 0x0a, 0x12, 0x12, 0x10]); // rules = 5 > clauses = 1 > matches = 2
    b.extend([0x5a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b']); // service_accounts = 11
    b.extend([0x62, 0x06, 0x0a, 0x01, b'c', 0x12, 0x01, b'd']); // not_service_accounts = 12
    b.extend([0x30, 0x01]); // dry_run = 6
    check(&a, &b);
}

#[test]
fn delta_discovery() {
    let mut versions = BTreeMap::new();
    versions.insert("a".to_string(), "1".to_string());
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "z".into(),
            ..Default::default()
        }),
        type_url: "t".into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: versions,
        response_nonce: "n".into(),
        error_detail: Some(Status {
            code: 3,
            message: "bad".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    let mut b = vec![0x0a, 0x03, 0x0a, 0x01, b'z']; // node = 1 > id = 1
    b.extend([0x12, 0x01, b't']); // type_url = 2
    b.extend([0x1a, 0x01, b'*']); // resource_names_subscribe = 3
    b.extend([0x2a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'1']); // initial_resource_versions = 5
    b.extend([0x32, 0x01, b'n']); // response_nonce = 6
    b.extend([0x3a, 0x07, 0x08, 0x03, 0x12, 0x03, b'b', b'a', b'd']); // error_detail = 7
    check(&req, &b);

    let resp = DeltaDiscoveryResponse {
        system_version_info: "s".into(),
        resources: vec![Resource {
            version: "v".into(),
            resource: Some(Any {
                type_url: "t".into(),
                value: vec![1],
            }),
            name: "n".into(),
            ..Default::default()
        }],
        type_url: "t".into(),
        nonce: "n".into(),
        removed_resources: vec!["r".into()],
        ..Default::default()
    };
    let mut b = vec![0x0a, 0x01, b's']; // system_version_info = 1
    b.extend([0x12, 0x0e, 0x0a, 0x01, b'v']); // resources = 2 > version = 1
    b.extend([0x12, 0x06, 0x0a, 0x01, b't', 0x12, 0x01, 0x01]); // resource = 2 (Any)
    b.extend([0x1a, 0x01, b'n']); // name = 3
    b.extend([0x22, 0x01, b't', 0x2a, 0x01, b'n', 0x32, 0x01, b'r']); // type_url 4, nonce 5, removed 6
    check(&resp, &b);
}

#[test]
fn zds_messages() {
    let add = WorkloadRequest {
        payload: Some(workload_request::Payload::Add(zds::AddWorkload {
            uid: "u".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "p".into(),
                namespace: "n".into(),
                service_account: "s".into(),
            }),
        })),
    };
    check(
        &add,
        &[
            0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'p', 0x12, 0x01, b'n', 0x1a,
            0x01, b's',
        ],
    );
    let del = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(zds::DelWorkload {
            uid: "u".into(),
        })),
    };
    check(&del, &[0x12, 0x03, 0x12, 0x01, b'u']); // del = 2 > uid = 2
    let keep = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(zds::KeepWorkload {
            uid: "u".into(),
        })),
    };
    check(&keep, &[0x2a, 0x03, 0x0a, 0x01, b'u']); // keep = 5
    let snap = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(
            zds::SnapshotSent {},
        )),
    };
    check(&snap, &[0x1a, 0x00]);
    let ack = WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: "e".into(),
        })),
    };
    check(&ack, &[0x0a, 0x03, 0x0a, 0x01, b'e']);
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    check(&hello, &[0x08, 0x01]);
}

#[test]
fn grpc_service_names() {
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    use mesh_proto::istio::ca::istio_certificate_service_server::IstioCertificateServiceServer;
    use tonic::server::NamedService;
    struct Ca;
    #[tonic::async_trait]
    impl mesh_proto::istio::ca::istio_certificate_service_server::IstioCertificateService for Ca {
        async fn create_certificate(
            &self,
            _: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
    assert_eq!(
        <IstioCertificateServiceServer<Ca> as NamedService>::NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    fn ads_name<T: NamedService>() -> &'static str {
        T::NAME
    }
    struct Ads;
    #[tonic::async_trait]
    impl mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService for Ads {
        type DeltaAggregatedResourcesStream =
            std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;
        async fn delta_aggregated_resources(
            &self,
            _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
    assert_eq!(
        ads_name::<AggregatedDiscoveryServiceServer<Ads>>(),
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}

#[test]
fn waypoint_service_routes() {
    use mesh_proto::mesh::waypoint::{
        ExtAuthzProvider, Policy, PolicyAction, PortProtocol, Protocol, Retry, Route, RouteMatch,
        ServiceRoutes, StringMatch, WeightedBackend, string_match,
    };
    let routes = ServiceRoutes {
        hostname: "a".into(),
        namespace: "n".into(),
        routes: vec![Route {
            name: "r".into(),
            request_match: Some(RouteMatch {
                path: Some(StringMatch {
                    kind: Some(string_match::Kind::Prefix("/".into())),
                }),
                ..Default::default()
            }),
            backends: vec![WeightedBackend {
                service: "s".into(),
                port: 80,
                weight: 90,
                ..Default::default()
            }],
            request_timeout_ms: 500,
            retry: Some(Retry {
                attempts: 2,
                codes: vec![503],
                ..Default::default()
            }),
            ..Default::default()
        }],
        backend_policy: None,
        ports: vec![PortProtocol {
            port: 80,
            protocol: Protocol::Http2 as i32,
        }],
        policies: vec![
            Policy {
                name: "p".into(),
                action: PolicyAction::Deny as i32,
                rules: vec![],
                provider: None,
                dry_run: true,
            },
            Policy {
                name: "c".into(),
                action: PolicyAction::Custom as i32,
                rules: vec![],
                provider: Some(ExtAuthzProvider {
                    name: "x".into(),
                    address: "a:1".into(),
                    fail_open: true,
                    ..Default::default()
                }),
                dry_run: false,
            },
        ],
        default_rate_limit: None,
    };
    let mut b = vec![0x0a, 0x01, b'a', 0x12, 0x01, b'n']; // hostname = 1, namespace = 2
    b.extend([0x1a, 0x1e]); // routes = 3, 30 bytes
    b.extend([0x0a, 0x01, b'r']); // name = 1
    b.extend([0x12, 0x05, 0x0a, 0x03, 0x12, 0x01, b'/']); // request_match = 2: path = 1: prefix = 2
    b.extend([0x22, 0x07, 0x0a, 0x01, b's', 0x10, 0x50, 0x18, 0x5a]); // backends = 4
    b.extend([0x28, 0xf4, 0x03]); // request_timeout_ms = 5 (varint 500)
    b.extend([0x3a, 0x06, 0x08, 0x02, 0x12, 0x02, 0xf7, 0x03]); // retry = 7, codes packed (varint 503)
    b.extend([0x2a, 0x04, 0x08, 0x50, 0x10, 0x02]); // ports = 5: port 80, HTTP2 = 2
    b.extend([0x32, 0x07, 0x0a, 0x01, b'p', 0x10, 0x01, 0x20, 0x01]); // policies = 6: name, DENY = 1, dry_run = 4
    // policies = 6: name, CUSTOM = 2, provider = 5 {name = 1, address = 2, fail_open = 4}
    b.extend([0x32, 0x11, 0x0a, 0x01, b'c', 0x10, 0x02, 0x2a, 0x0a]);
    b.extend([0x0a, 0x01, b'x', 0x12, 0x03, b'a', b':', b'1', 0x20, 0x01]);
    check(&routes, &b);
}
