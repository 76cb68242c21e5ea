//! How much a `DeltaDiscoveryRequest` may be, checked before it is decoded.
//!
//! A request's bytes are bounded by size: a stream's first request of
//! each type may be large only for a node's proxy (a reconnecting ztunnel
//! lists every name and version it holds of the type), every other
//! request and every workload's are small. Size alone does not bound what decoding allocates: an empty name
//! is two bytes on the wire and a `String` in memory, so the names and
//! held versions a request carries are counted on the wire first
//! ([`check`]), and a request carrying more than the controller's bound is
//! refused before prost allocates any of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Buf;
use mesh_proto::envoy::config::core::v3::Node;
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_proto::google::rpc::Status as RpcStatus;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint};
use tonic::Status;

use super::TYPES;
use super::budget::{Held, SMALL};

/// Largest first request of a node's proxy: what it holds is listed in it
/// (some 5 MB at 50 000 pods and 10 000 services), so as large as the
/// responses a ztunnel accepts.
pub const MAX_FIRST_REQUEST: usize = 64 * 1024 * 1024;

/// The types whose first request may be that large: what a ztunnel holds
/// (every workload and policy). A waypoint's routes and an ingress
/// gateway's own resource are few.
pub const LARGE_TYPES: [&str; 2] = [
    mesh_proto::ADDRESS_TYPE_URL,
    mesh_proto::AUTHORIZATION_TYPE_URL,
];

/// Bytes of large first requests (over [`MAX_REQUEST`]) one node's streams
/// may hold at once, in all: what its ztunnel states on one stream, and on
/// the next while the last is still open. Each stream holds its share
/// until it ends, so no number of streams multiplies it.
pub const MAX_LARGE_PER_NODE: usize = 2 * MAX_FIRST_REQUEST;

/// Largest request otherwise (a workload's first request, and every later
/// request: ACKs, NACKs, subscriptions by name); also a workload's share
/// of requests in flight across its streams.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Largest `node` or `error_detail` field (each may occur once): nested
/// messages are not counted, so they are kept small instead, and only
/// what the controller reads of them is decoded.
pub const MAX_NESTED: usize = 64 * 1024;

/// `DeltaDiscoveryRequest` fields (envoy/service/discovery/v3/discovery.proto).
const NODE: u32 = 1;
const TYPE_URL: u32 = 2;
const RESOURCE_NAMES_SUBSCRIBE: u32 = 3;
const RESOURCE_NAMES_UNSUBSCRIBE: u32 = 4;
const INITIAL_RESOURCE_VERSIONS: u32 = 5;
const ERROR_DETAIL: u32 = 7;

/// Why a request is refused before it is decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request of {size} bytes; at most {limit} may be")]
    TooLarge { size: usize, limit: usize },
    #[error("request carries more than {limit} names and held versions")]
    TooManyEntries { limit: usize },
    #[error("field {field} of {size} bytes; at most {MAX_NESTED} may be")]
    NestedTooLarge { field: u32, size: usize },
    #[error("field {field} occurs more than once; it may occur once")]
    Repeated { field: u32 },
    #[error("malformed request: {0}")]
    Malformed(String),
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::TooLarge { .. } => Status::out_of_range(e.to_string()),
            RequestError::TooManyEntries { .. } | RequestError::NestedTooLarge { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            RequestError::Malformed(_) | RequestError::Repeated { .. } => {
                Status::invalid_argument(e.to_string())
            }
        }
    }
}

/// One stream's request limits. A request over [`MAX_REQUEST`] is taken
/// only from a node's proxy, and only as the stream's first request of its
/// type (at most one per type in [`TYPES`]); the entry bound is the hub's.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The caller is a node's proxy.
    node: Arc<AtomicBool>,
    /// Bit i: a request of `TYPES[i]` has been read on this stream.
    seen: Arc<AtomicUsize>,
    entries: Arc<AtomicUsize>,
    /// The stream's share of the shared request budget, if it has one.
    held: Option<Arc<Held>>,
    /// The stream's part of its caller's share (see `budget::Counted`).
    share: Option<Arc<Held>>,
}

impl Limits {
    /// Small requests, until the caller is known to be a node's proxy.
    pub fn new(entries: Arc<AtomicUsize>) -> Limits {
        Limits {
            node: Arc::new(AtomicBool::new(false)),
            seen: Arc::new(AtomicUsize::new(0)),
            entries,
            held: None,
            share: None,
        }
    }

    /// Gives back to `share` each ordinary request's bytes once it is
    /// decoded; a large one's (a node's first request of a type) stay
    /// taken while the stream lasts.
    pub fn with_share(mut self, share: Arc<Held>) -> Limits {
        self.share = Some(share);
        self
    }

    /// Gives back to `held` each request's bytes once it is decoded.
    pub fn with_held(mut self, held: Arc<Held>) -> Limits {
        self.held = Some(held);
        self
    }

    /// A request of `bytes` has been decoded (or refused).
    pub fn decoded(&self, bytes: usize) {
        if bytes <= SMALL {
            return;
        }
        if let Some(h) = &self.held {
            h.decoded(bytes);
        }
        if bytes <= MAX_REQUEST
            && let Some(s) = &self.share
        {
            s.decoded(bytes);
        }
    }

    /// The caller is a node's proxy: each type's first request may be large.
    pub fn node_caller(&self) {
        self.node.store(true, Ordering::Relaxed);
    }

    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// The size a request naming `type_url` may be; marks the type seen.
    fn size_for(&self, type_url: &[u8]) -> usize {
        let Some(i) = TYPES.iter().position(|t| t.as_bytes() == type_url) else {
            return MAX_REQUEST;
        };
        let first = self.seen.fetch_or(1 << i, Ordering::Relaxed) & (1 << i) == 0;
        let large = LARGE_TYPES.iter().any(|t| t.as_bytes() == type_url);
        if first && large && self.node.load(Ordering::Relaxed) {
            MAX_FIRST_REQUEST
        } else {
            MAX_REQUEST
        }
    }
}

/// Walks the request's top-level fields without allocating: refuses one
/// that carries more than `entries` names and held versions in all, a
/// nested message over [`MAX_NESTED`], or a second `node` or
/// `error_detail` (prost would merge the copies: sixty 64 KiB ones are
/// sixty times the content). Returns its `type_url` (the last, as
/// decoding takes it).
pub fn check(mut buf: &[u8], entries: usize) -> Result<&[u8], RequestError> {
    let mut counted = 0usize;
    let mut nested_seen = [false; 2];
    let mut type_url: &[u8] = &[];
    while buf.has_remaining() {
        let (field, wire_type) = decode_key(&mut buf).map_err(bad)?;
        let Some(value) = next_field(&mut buf, wire_type)? else {
            continue;
        };
        match field {
            RESOURCE_NAMES_SUBSCRIBE | RESOURCE_NAMES_UNSUBSCRIBE | INITIAL_RESOURCE_VERSIONS => {
                counted += 1;
                if counted > entries {
                    return Err(RequestError::TooManyEntries { limit: entries });
                }
            }
            NODE | ERROR_DETAIL => {
                let seen = &mut nested_seen[usize::from(field == ERROR_DETAIL)];
                if std::mem::replace(seen, true) {
                    return Err(RequestError::Repeated { field });
                }
                if value.len() > MAX_NESTED {
                    return Err(RequestError::NestedTooLarge {
                        field,
                        size: value.len(),
                    });
                }
            }
            TYPE_URL => type_url = value,
            _ => {}
        }
    }
    Ok(type_url)
}

fn bad(e: prost::DecodeError) -> RequestError {
    RequestError::Malformed(e.to_string())
}

/// Moves past one field's value: the value's bytes if it is
/// length-delimited, else None.
fn next_field<'a>(
    buf: &mut &'a [u8],
    wire_type: WireType,
) -> Result<Option<&'a [u8]>, RequestError> {
    match wire_type {
        WireType::Varint => {
            decode_varint(buf).map_err(bad)?;
        }
        WireType::SixtyFourBit => skip(buf, 8)?,
        WireType::ThirtyTwoBit => skip(buf, 4)?,
        WireType::LengthDelimited => {
            let len = decode_varint(buf).map_err(bad)?;
            let len = usize::try_from(len)
                .map_err(|_| RequestError::Malformed("length past usize".into()))?;
            let all: &'a [u8] = buf;
            let value = all
                .get(..len)
                .ok_or_else(|| RequestError::Malformed("truncated field".into()))?;
            *buf = &all[len..];
            return Ok(Some(value));
        }
        WireType::StartGroup | WireType::EndGroup => {
            return Err(RequestError::Malformed("groups are not used".into()));
        }
    }
    Ok(None)
}

fn skip(buf: &mut &[u8], n: usize) -> Result<(), RequestError> {
    if buf.len() < n {
        return Err(RequestError::Malformed("truncated field".into()));
    }
    buf.advance(n);
    Ok(())
}

/// Decodes a checked request. Of `node` only its `id` is decoded, of
/// `error_detail` only its `code` and `message`: all the controller reads,
/// so no nested content (metadata, details, extensions) is ever allocated.
fn decode_checked(mut buf: &[u8]) -> Result<DeltaDiscoveryRequest, RequestError> {
    let mut req = DeltaDiscoveryRequest::default();
    while buf.has_remaining() {
        let (field, wire_type) = decode_key(&mut buf).map_err(bad)?;
        match field {
            NODE | ERROR_DETAIL => {
                if wire_type != WireType::LengthDelimited {
                    return Err(RequestError::Malformed(format!(
                        "field {field} is not a message"
                    )));
                }
                let Some(value) = next_field(&mut buf, wire_type)? else {
                    continue;
                };
                if field == NODE {
                    req.node = Some(node_id(value)?);
                } else {
                    req.error_detail = Some(status_text(value)?);
                }
            }
            _ => req
                .merge_field(field, wire_type, &mut buf, DecodeContext::default())
                .map_err(bad)?,
        }
    }
    Ok(req)
}

/// A `Node` of its `id` alone (field 1).
fn node_id(mut buf: &[u8]) -> Result<Node, RequestError> {
    let mut node = Node::default();
    while buf.has_remaining() {
        let (field, wire_type) = decode_key(&mut buf).map_err(bad)?;
        let value = next_field(&mut buf, wire_type)?;
        if let (1, Some(v)) = (field, value) {
            node.id = text(v)?;
        }
    }
    Ok(node)
}

/// A `google.rpc.Status` of its `code` (field 1) and `message` (field 2).
fn status_text(mut buf: &[u8]) -> Result<RpcStatus, RequestError> {
    let mut status = RpcStatus::default();
    while buf.has_remaining() {
        let (field, wire_type) = decode_key(&mut buf).map_err(bad)?;
        if (field, wire_type) == (1, WireType::Varint) {
            // As prost reads an int32: the low 32 bits.
            status.code = decode_varint(&mut buf).map_err(bad)? as i32;
            continue;
        }
        let value = next_field(&mut buf, wire_type)?;
        if let (2, Some(v)) = (field, value) {
            status.message = text(v)?;
        }
    }
    Ok(status)
}

fn text(v: &[u8]) -> Result<String, RequestError> {
    String::from_utf8(v.to_vec())
        .map_err(|_| RequestError::Malformed("a string is not UTF-8".into()))
}

/// Checks a request's entries and size, then decodes it.
pub fn decode(mut buf: impl Buf, limits: &Limits) -> Result<DeltaDiscoveryRequest, RequestError> {
    let size = buf.remaining();
    if size > MAX_FIRST_REQUEST {
        return Err(RequestError::TooLarge {
            size,
            limit: MAX_FIRST_REQUEST,
        });
    }
    let bytes = buf.copy_to_bytes(size);
    let limit = limits.size_for(check(&bytes, limits.entries())?);
    if size > limit {
        return Err(RequestError::TooLarge { size, limit });
    }
    decode_checked(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(node: bool, entries: usize) -> Limits {
        let l = Limits::new(Arc::new(AtomicUsize::new(entries)));
        if node {
            l.node_caller();
        }
        l
    }

    #[test]
    fn a_request_within_its_bounds_decodes() {
        let req = DeltaDiscoveryRequest {
            type_url: "t".into(),
            resource_names_subscribe: vec!["a".into(), "b".into()],
            initial_resource_versions: [("c".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let got = decode(req.encode_to_vec().as_slice(), &limits(false, 3)).expect("decodes");
        assert_eq!(got, req);
        assert_eq!(
            decode(req.encode_to_vec().as_slice(), &limits(false, 2)),
            Err(RequestError::TooManyEntries { limit: 2 })
        );
    }

    /// A request over 4 MiB (here a 5 MiB nonce) of `type_url`.
    fn large(type_url: &str) -> Vec<u8> {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: "n".repeat(5 << 20),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn only_a_nodes_first_request_of_each_type_may_be_large() {
        use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
        let too_large = |r: Result<DeltaDiscoveryRequest, RequestError>| {
            matches!(
                r,
                Err(RequestError::TooLarge {
                    limit: MAX_REQUEST,
                    ..
                })
            )
        };
        let node = limits(true, 10);
        assert!(decode(large(ADDRESS_TYPE_URL).as_slice(), &node).is_ok());
        assert!(too_large(decode(large(ADDRESS_TYPE_URL).as_slice(), &node)));
        assert!(decode(large(AUTHORIZATION_TYPE_URL).as_slice(), &node).is_ok());
        assert!(too_large(decode(large("x.Y").as_slice(), &node)));
        // Only of the types a ztunnel holds: routes and ingresses are few.
        for t in [
            mesh_proto::SERVICE_ROUTES_TYPE_URL,
            mesh_proto::INGRESS_TYPE_URL,
        ] {
            assert!(too_large(decode(large(t).as_slice(), &limits(true, 10))));
        }
        // A small first request uses up its type's large one.
        let node = limits(true, 10);
        let small = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            ..Default::default()
        };
        assert!(decode(small.encode_to_vec().as_slice(), &node).is_ok());
        assert!(too_large(decode(large(ADDRESS_TYPE_URL).as_slice(), &node)));
        // A workload's never is.
        let pod = limits(false, 10);
        assert!(too_large(decode(large(ADDRESS_TYPE_URL).as_slice(), &pod)));
    }

    #[test]
    fn a_large_node_is_refused() {
        let req = DeltaDiscoveryRequest {
            node: Some(mesh_proto::envoy::config::core::v3::Node {
                cluster: "c".repeat(MAX_NESTED + 1),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            decode(req.encode_to_vec().as_slice(), &limits(true, 10)),
            Err(RequestError::NestedTooLarge { field: NODE, .. })
        ));
    }
}
