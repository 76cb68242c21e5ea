//! A request is bounded by what decoding it allocates, not only by its
//! size: an empty name is two bytes on the wire and a `String` (24 bytes
//! and more) once decoded. One carrying millions of them is refused before
//! it is decoded (this binary counts every allocation).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use istiod_lite::xds::request::{self, Limits, MAX_FIRST_REQUEST, RequestError};
use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use prost::Message;

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
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
    let before = ALLOCATED.load(Ordering::Relaxed);
    let got = request::decode(wire.as_slice(), &limits);
    let allocated = ALLOCATED.load(Ordering::Relaxed) - before;
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
