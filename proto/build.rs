//! Compiles `protos/` with protox (pure Rust), so no system `protoc` is needed.

use std::error::Error;

const FILES: &[&str] = &[
    "istio/ca.proto",
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/zds.proto",
    "envoy/discovery.proto",
    "envoy/auth.proto",
    "mesh/waypoint.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(FILES, ["protos"])?;
    tonic_prost_build::configure()
        // Ordered maps: a message then always encodes to the same bytes, and
        // the controller versions resources by a hash of their bytes.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
