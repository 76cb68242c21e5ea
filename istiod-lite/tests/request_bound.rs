//! A request is bounded by what decoding it allocates, not only by its
//! size: an empty name is two bytes on the wire and a `String` (24 bytes
//! and more) once decoded. One carrying millions of them is refused before
//! it is decoded (this binary counts every allocation, per thread: the
//! tests run beside each other, and one's vectors of millions were counted
//! against another's decode).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use istiod_lite::xds::request::{self, Limits, MAX_FIRST_REQUEST, RequestError};
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use prost::Message;

struct Counting;

thread_local! {
    /// What this thread has allocated (const: no allocation to set it up).
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(n: usize) {
    // Not during the thread's teardown.
    let _ = ALLOCATED.try_with(|a| a.set(a.get() + n));
}

/// What this thread has allocated so far.
fn allocated() -> usize {
    ALLOCATED.with(Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn millions_of_empty_names_are_refused_before_they_are_decoded() {
    // 8 million empty names and 4 million empty held versions: 32 MiB,
    // within a node's first request.
    let req = DeltaDiscoveryRequest {
        type_url: mesh_proto::ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec![String::new(); 8_000_000],
        initial_resource_versions: (0..4_000_000u32)
            .map(|i| (i.to_string(), String::new()))
            .collect(),
        ..Default::default()
    };
    let wire = req.encode_to_vec();
    drop(req);
    assert!(wire.len() < MAX_FIRST_REQUEST, "{} bytes", wire.len());
    let limits = Limits::new(Arc::new(AtomicUsize::new(200_000)));
    limits.node_caller();
    let before = allocated();
    let got = request::decode(wire.as_slice(), &limits);
    let allocated = allocated() - before;
    // The request's own copy, and nothing per name.
    assert!(
        allocated <= wire.len() + (1 << 20),
        "{allocated} bytes allocated for a {}-byte request",
        wire.len()
    );
    assert_eq!(
        got.err(),
        Some(RequestError::TooManyEntries { limit: 200_000 })
    );
}

/// A `google.rpc.Status` of `n` empty `details` entries (2 bytes each on
/// the wire, a `prost_types::Any` of some 48 bytes each once decoded).
fn status_of_empty_details(n: usize) -> Vec<u8> {
    let mut s = vec![0x08, 0x03]; // code = 3
    for _ in 0..n {
        s.extend([0x1a, 0x00]); // details = 3, empty
    }
    s
}

/// Field 7 (`error_detail`) holding `inner`, then `type_url`.
fn with_error_details(copies: usize, inner: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..copies {
        b.push(0x3a);
        prost::encoding::encode_varint(inner.len() as u64, &mut b);
        b.extend_from_slice(inner);
    }
    b.push(0x12); // type_url = 2
    let t = mesh_proto::ADDRESS_TYPE_URL.as_bytes();
    prost::encoding::encode_varint(t.len() as u64, &mut b);
    b.extend_from_slice(t);
    b
}

/// Decodes `wire` as a workload's request: (result, bytes allocated).
fn decode_counted(wire: &[u8]) -> (Result<DeltaDiscoveryRequest, RequestError>, usize) {
    let limits = Limits::new(Arc::new(AtomicUsize::new(200_000)));
    let before = allocated();
    let got = request::decode(wire, &limits);
    (got, allocated() - before)
}

/// Prost merges repeated occurrences of a singular message field: sixty
/// 64 KiB `error_detail`s of empty `details` would decode to some 90 MiB
/// from under 4 MiB. A second `node` or `error_detail` is refused unread.
#[test]
fn a_merged_error_detail_is_refused_without_decoding() {
    let inner = status_of_empty_details(request::MAX_NESTED / 2 - 2);
    assert!(inner.len() <= request::MAX_NESTED);
    let wire = with_error_details(60, &inner);
    assert!(wire.len() < request::MAX_REQUEST, "{} bytes", wire.len());
    let (got, allocated) = decode_counted(&wire);
    assert!(
        allocated <= wire.len() + (1 << 20),
        "{allocated} bytes allocated for a {}-byte request",
        wire.len()
    );
    assert!(
        matches!(got, Err(RequestError::Repeated { field: 7 })),
        "{got:?}"
    );
    // A repeated node likewise.
    let mut two_nodes = vec![0x0a, 0x03, 0x0a, 0x01, b'z'];
    two_nodes.extend([0x0a, 0x03, 0x0a, 0x01, b'y']);
    let (got, _) = decode_counted(&two_nodes);
    assert!(
        matches!(got, Err(RequestError::Repeated { field: 1 })),
        "{got:?}"
    );
}

/// Of a nested message only what the controller reads is decoded (the
/// node's id, the NACK's code and message): one 64 KiB `error_detail` of
/// empty `details`, or a node whose metadata has thousands of keys, costs
/// no more than its bytes.
#[test]
fn nested_content_the_controller_does_not_read_is_not_decoded() {
    let inner = status_of_empty_details(request::MAX_NESTED / 2 - 2);
    let wire = with_error_details(1, &inner);
    let (got, allocated) = decode_counted(&wire);
    let got = got.expect("decodes");
    let status = got.error_detail.expect("error detail");
    assert_eq!((status.code, status.details.len()), (3, 0));
    assert!(
        allocated <= wire.len() + (64 << 10),
        "{allocated} bytes allocated for a {}-byte request",
        wire.len()
    );
    use mesh_proto::envoy::config::core::v3::Node;
    let node = Node {
        id: "ztunnel~n".into(),
        metadata: Some(prost_types::Struct {
            fields: (0..8000)
                .map(|i| (format!("{i}"), prost_types::Value::default()))
                .collect(),
        }),
        ..Default::default()
    };
    let req = DeltaDiscoveryRequest {
        node: Some(node),
        type_url: mesh_proto::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    };
    let wire = req.encode_to_vec();
    assert!(wire.len() <= request::MAX_NESTED, "{} bytes", wire.len());
    let (got, allocated) = decode_counted(&wire);
    let node = got.expect("decodes").node.expect("node");
    assert_eq!(node.id, "ztunnel~n");
    assert!(node.metadata.is_none());
    assert!(
        allocated <= wire.len() + (64 << 10),
        "{allocated} bytes allocated for a {}-byte request",
        wire.len()
    );
}
