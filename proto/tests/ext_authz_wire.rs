//! The external authorization messages against bytes written by hand from
//! Envoy's public schema (envoy.service.auth.v3, envoy.config.core.v3,
//! envoy.type.v3): both directions, as in `wire.rs`. A wrong field number
//! or type fails here, and a real server would then be misunderstood.

use std::collections::BTreeMap;

use mesh_proto::envoy::config::core::v3::{
    Address, HeaderValue, HeaderValueOption, QueryParameter, SocketAddress, address,
    header_value_option::HeaderAppendAction, socket_address,
};
use mesh_proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context, authorization_server, check_response,
};
use mesh_proto::envoy::r#type::v3::{HttpStatus, StatusCode};
use mesh_proto::google::rpc::Status;
use prost::Message;

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, bytes: &[u8]) {
    assert_eq!(msg.encode_to_vec(), bytes, "encoding of {msg:?}");
    assert_eq!(&M::decode(bytes).expect("decodes"), msg);
}

/// `bytes` as a length-delimited field `tag` (one-byte tag and length).
fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128);
    let mut v = vec![tag, bytes.len() as u8];
    v.extend_from_slice(bytes);
    v
}

#[test]
fn the_service_is_envoys() {
    assert_eq!(
        authorization_server::SERVICE_NAME,
        "envoy.service.auth.v3.Authorization"
    );
}

#[test]
fn check_request() {
    let mut headers = BTreeMap::new();
    headers.insert("a".to_string(), "b".to_string());
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        protocol: 0,
                        address: "10.0.0.1".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(5)),
                    })),
                }),
                principal: "p".into(),
            }),
            destination: None,
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "i".into(),
                    method: "GET".into(),
                    headers,
                    path: "/".into(),
                    host: "h".into(),
                    scheme: "http".into(),
                    size: -1,
                    protocol: "HTTP/2".into(),
                }),
            }),
        }),
    };
    // SocketAddress: address = 2, port_value = 3 (protocol TCP = 0 is not written).
    let mut sock = vec![0x12, 0x08];
    sock.extend(b"10.0.0.1");
    sock.extend([0x18, 0x05]);
    let addr = field(0x0a, &sock); // Address.socket_address = 1
    let mut peer = field(0x0a, &addr); // Peer.address = 1
    peer.extend([0x22, 0x01, b'p']); // Peer.principal = 4
    let mut http = vec![0x0a, 0x01, b'i']; // id = 1
    http.extend([0x12, 0x03, b'G', b'E', b'T']); // method = 2
    http.extend([0x1a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b']); // headers = 3, one entry
    http.extend([0x22, 0x01, b'/']); // path = 4
    http.extend([0x2a, 0x01, b'h']); // host = 5
    http.extend([0x32, 0x04, b'h', b't', b't', b'p']); // scheme = 6
    // size = 9, int64 -1: ten-byte varint.
    http.extend([
        0x48, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    http.extend([0x52, 0x06]); // protocol = 10
    http.extend(b"HTTP/2");
    let request = field(0x12, &http); // Request.http = 2
    let mut ctx = field(0x0a, &peer); // AttributeContext.source = 1
    ctx.extend(field(0x22, &request)); // AttributeContext.request = 4
    check(&req, &field(0x0a, &ctx)); // CheckRequest.attributes = 1
}

#[test]
fn denied_response() {
    let resp = CheckResponse {
        status: Some(Status {
            code: 7,
            ..Default::default()
        }),
        http_response: Some(check_response::HttpResponse::DeniedResponse(
            DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: StatusCode::Unauthorized as i32,
                }),
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "k".into(),
                        value: "v".into(),
                        raw_value: Vec::new(),
                    }),
                    append: Some(false),
                    append_action: 0,
                    keep_empty_value: false,
                }],
                body: "no".into(),
            },
        )),
    };
    let mut b = vec![0x0a, 0x02, 0x08, 0x07]; // status = 1 { code = 1: 7 }
    let mut denied = vec![0x0a, 0x03, 0x08, 0x91, 0x03]; // status = 1 { code = 1: 401 }
    // headers = 2 { header = 1 {key = 1, value = 2}, append = 2 (BoolValue false: empty) }
    denied.extend([
        0x12, 0x0a, 0x0a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', 0x12, 0x00,
    ]);
    denied.extend([0x1a, 0x02, b'n', b'o']); // body = 3
    b.extend(field(0x12, &denied)); // denied_response = 2
    check(&resp, &b);
}

#[test]
fn ok_response() {
    let resp = CheckResponse {
        status: Some(Status::default()),
        http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x".into(),
                    value: "1".into(),
                    raw_value: Vec::new(),
                }),
                append: None,
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                keep_empty_value: false,
            }],
            headers_to_remove: vec!["y".into()],
            response_headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "z".into(),
                    value: String::new(),
                    raw_value: b"2".to_vec(),
                }),
                ..Default::default()
            }],
            query_parameters_to_set: vec![QueryParameter {
                key: "q".into(),
                value: "3".into(),
            }],
            query_parameters_to_remove: vec!["r".into()],
        })),
    };
    let mut b = vec![0x0a, 0x00]; // status = 1, present and empty (code OK)
    // headers = 2 { header = 1 {key, value}, append_action = 3: 2 }
    let mut ok = vec![
        0x12, 0x0a, 0x0a, 0x06, 0x0a, 0x01, b'x', 0x12, 0x01, b'1', 0x18, 0x02,
    ];
    ok.extend([0x2a, 0x01, b'y']); // headers_to_remove = 5
    // response_headers_to_add = 6 { header = 1 {key = 1, raw_value = 3} }
    ok.extend([0x32, 0x08, 0x0a, 0x06, 0x0a, 0x01, b'z', 0x1a, 0x01, b'2']);
    // query_parameters_to_set = 7 {key = 1, value = 2}
    ok.extend([0x3a, 0x06, 0x0a, 0x01, b'q', 0x12, 0x01, b'3']);
    ok.extend([0x42, 0x01, b'r']); // query_parameters_to_remove = 8
    b.extend(field(0x1a, &ok)); // ok_response = 3
    check(&resp, &b);
}
