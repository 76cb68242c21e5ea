//! Compiles `protos/` with protox (pure Rust), so no system `protoc` is needed.

use std::error::Error;

const FILES: &[&str] = &[
    "istio/ca.proto",
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/zds.proto",
    "envoy/discovery.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(FILES, ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
